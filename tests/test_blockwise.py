"""Block-wise reconstruction (qpass.blockwise) and the passes on it: signround, omniquant (LWC)."""
import pytest
import torch

import qpass
from qpass.errors import QuantizationError, RecipeError
from qpass.graph import linear_sites, op_counts, param_of
from qpass.passes.signround import LearnedWeightQuantizer
from qpass.primitives import quant as Q
from qpass.quantizer import Quantizer, quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s, t=12) for s in range(4)]
W3G = {"bits": 3, "granularity": "per_group", "group_size": 16, "symmetric": True}
W2A = {"bits": 2, "granularity": "per_group", "group_size": 16, "symmetric": False}
W4 = {"bits": 4, "granularity": "per_channel", "symmetric": True}
A4 = {"bits": 4, "granularity": "per_token", "dynamic": True}


def quant(weights=W3G, activations=None):
    return {"quantize": {"weights": weights, "activations": activations, "ignore": ["lm_head"]}}


def run(*passes, model=None):
    return qpass.apply(model or toy.hf_model("llama"), {"passes": list(passes)}, calib_data=CALIB, progress=False)


def out_mse(qm, model, ids):
    with torch.no_grad():
        return float((qm(ids).logits - model(ids).logits).pow(2).mean())


def weights_exact(gm, stats=None):
    """Every weight quantizer of a trained block maps its (baked) weight to itself (blocks that kept their start
    keep their float weights)."""
    trained = [b for b, r in stats["per_block"].items() if r["kept"] == "trained"] if stats else None
    assert trained is None or trained
    for q in quantizers(gm, role="weight"):
        if trained is not None and not any(q.path.startswith(b + ".") for b in trained):
            continue
        w = param_of(gm, q.x)
        zp = None if q.zero_point is None else param_of(gm, q.zero_point)
        assert torch.equal(Q.fake_quantize(w, param_of(gm, q.scale), zp, q.block, q.fmt_name), w)


@pytest.mark.parametrize("passes", [[{"signround": {"steps": 30, "holdout": 0}}],
                                    [{"omniquant": {"steps": 30, "holdout": 0}}]],
                         ids=["signround", "omniquant"])
@pytest.mark.parametrize("weights", [W3G, W2A], ids=["w3g16sym", "w2g16asym"])
def test_it_fires_lowers_the_block_loss_and_bakes_exact_weights(passes, weights):
    model = toy.hf_model("llama")
    rtn = run(quant(weights), model=model)
    qm = run(quant(weights), *passes, model=model)
    name = next(iter(passes[0]))
    st = qm.report[name].stats
    assert st["blocks"] == 2 and st["linears"] == 14
    assert all(b["loss_best"] <= b["loss_start"] for b in st["per_block"].values())
    assert st["mean_loss_ratio"] < 1.0
    assert op_counts(qm.graph_module) == op_counts(rtn.graph_module)          # no node added
    weights_exact(qm.graph_module, st)
    ids = torch.cat(CALIB)          # the calibration set (a random toy with 48 tokens: held-out text is noise)
    assert out_mse(qm, model, ids) < out_mse(rtn, model, ids)


def test_it_is_deterministic_for_a_seed_and_depends_on_it():
    a = run(quant(), {"signround": {"steps": 10, "batch_size": 2}})
    b = run(quant(), {"signround": {"steps": 10, "batch_size": 2}})
    c = run(quant(), {"signround": {"steps": 10, "batch_size": 2, "seed": 1}})
    sa, sb, sc = (m.graph_module.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("clip", ["minmax", "sigmoid"])
def test_baking_leaves_the_weight_the_trained_block_computed(clip):
    qm = run(quant(W2A))
    gm = qm.graph_module
    g = torch.Generator().manual_seed(0)
    learned = []
    for s in linear_sites(gm):
        if Quantizer.of(s.weight_use) is None:
            continue
        lq = LearnedWeightQuantizer(gm, s, rounding=clip == "minmax", clip=clip)
        with torch.no_grad():
            if lq.v is not None:
                lq.v.copy_(torch.rand(lq.v.shape, generator=g) - 0.5)
            lo, hi = (0.6, 1.0) if clip == "minmax" else (-1.0, 5.0)
            lq.a_min.copy_(lo + (hi - lo) * torch.rand(lq.a_min.shape, generator=g))
            lq.a_max.copy_(lo + (hi - lo) * torch.rand(lq.a_max.shape, generator=g))
        learned.append((lq, lq.value().detach().clone()))
    for lq, trained in learned:
        lq.bake()
        q = lq.q
        zp = None if q.zero_point is None else param_of(gm, q.zero_point)
        graph_w = Q.fake_quantize(param_of(gm, q.x), param_of(gm, q.scale), zp, q.block, q.fmt_name)
        assert torch.equal(graph_w, trained)


def test_at_the_start_it_is_rtn_and_zero_steps_change_nothing():
    rtn = run(quant(W2A))
    s = next(s for s in linear_sites(rtn.graph_module) if Quantizer.of(s.weight_use))
    lq = LearnedWeightQuantizer(rtn.graph_module, s, rounding=True, clip="minmax")
    q = lq.q
    zp = None if q.zero_point is None else param_of(rtn.graph_module, q.zero_point)
    assert torch.equal(lq.value(), Q.fake_quantize(lq.w, param_of(rtn.graph_module, q.scale), zp, q.block,
                                                   q.fmt_name))
    qm = run(quant(W2A), {"signround": {"steps": 0}})
    assert qm.report["signround"].stats["kept_start"] == 2
    sa, sb = rtn.graph_module.state_dict(), qm.graph_module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weight_activation_recipe_trains_with_activation_quantizers_live():
    model = toy.hf_model("llama")
    rtn = run(quant(W4, A4), model=model)
    qm = run(quant(W4, A4), {"omniquant": {"steps": 40, "lr": 0.05, "let": False, "holdout": 0}}, model=model)
    assert op_counts(qm.graph_module) == op_counts(rtn.graph_module)
    st = qm.report["omniquant"].stats
    assert st["blocks"] == 2 and st["mean_loss_ratio"] < 1.0
    ids = torch.cat(CALIB)
    assert out_mse(qm, model, ids) < out_mse(rtn, model, ids)


def test_feed_float_and_one_segment_graphs_work():
    layer = toy.TinyDecoderLayer(d=32, heads=2, ffn=48)
    x = toy.seq_input(batch=2, t=8, d=32)
    gm = qpass.capture(layer, (x,))
    calib = [(toy.seq_input(batch=2, t=8, d=32, seed=s),) for s in range(3)]
    recipe = {"passes": [{"quantize": {"weights": W2A}}, {"signround": {"steps": 20, "feed": "float", "holdout": 0}}]}
    qm = qpass.apply(gm, recipe, calib_data=calib, progress=False)
    st = qm.report["signround"].stats
    assert st["blocks"] == 1 and st["linears"] == 7 and st["mean_loss_ratio"] < 1.0
    weights_exact(qm.graph_module)


def test_nothing_selected_is_a_no_op_and_missing_quantizers_a_clear_error():
    qm = run(quant(), {"signround": {"targets": ["q_proj"], "ignore": ["q_proj"]}})
    assert not qm.plans[1].structural and qm.report["signround"].stats["blocks"] == 0
    with pytest.raises(QuantizationError, match="place '- quantize"):
        run({"signround": {}})
    with pytest.raises(RecipeError, match="steps"):
        run(quant(), {"signround": {"steps": -1}})
    with pytest.raises(RecipeError, match="optimizer"):
        run(quant(), {"omniquant": {"optimizer": "sgd"}})
    with pytest.raises(RecipeError, match="init_logit"):
        run(quant(), {"omniquant": {"init_logit": 100.0}})


def test_it_lowers_to_torch_packed_and_onnx_with_parity(tmp_path):
    model = toy.hf_model("llama")
    qm = run(quant({**W3G, "group_size": 16}), {"signround": {"steps": 10}}, model=model)
    om = run(quant(W2A), {"omniquant": {"steps": 10}}, model=model)
    zm = run(quant(W3G), {"zeroquant": {"steps": 5, "lr": 1e-3}}, model=model)
    nm = run(quant(W2A), {"gptq": {}}, {"norm_tweak": {"steps": 5, "samples": 3, "seq_len": 8}}, model=model)
    ids = toy.token_ids(batch=1, t=9, seed=4)
    models = (qm, om, zm, nm)
    for m in models:
        pm = qpass.lower(m, "torch", kernels="exact")
        torch.testing.assert_close(pm(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    for i, m in enumerate(models):
        qpass.lower(m, "onnx", tmp_path / f"m{i}", fused_accuracy_level=0)
        got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / f"m{i}")), ids)
        torch.testing.assert_close(got.float(), m(ids).logits.float(), rtol=1e-4, atol=1e-4)


def test_zeroquant_lkd_trains_weights_and_norms_against_the_float_block():
    model = toy.hf_model("llama")
    w4a8 = quant(W3G, {"bits": 8, "granularity": "per_token", "dynamic": True})
    rtn = run(w4a8, model=model)
    qm = run(w4a8, {"zeroquant": {"steps": 30, "lr": 1e-3, "holdout": 0}}, model=model)
    st = qm.report["zeroquant"].stats
    assert st["blocks"] == 2 and st["linears"] == 14 and st["mean_loss_ratio"] < 1.0
    assert op_counts(qm.graph_module) == op_counts(rtn.graph_module)
    sa, sb = rtn.graph_module.state_dict(), qm.graph_module.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert any("layernorm" in k for k in changed) and any("q_proj_weight" in k or "q_proj.weight" in k
                                                            for k in changed)
    assert not any(k.endswith("_scale") for k in changed)          # quantizer scales stay as quantize chose them
    ids = torch.cat(CALIB)
    assert out_mse(qm, model, ids) < out_mse(rtn, model, ids)
    nn = run(w4a8, {"zeroquant": {"steps": 30, "lr": 1e-3, "norms": False, "holdout": 0}}, model=model)
    sn = nn.graph_module.state_dict()
    assert not any("layernorm" in k for k in sa if not torch.equal(sa[k], sn[k]))


def test_norm_tweak_after_gptq_changes_only_norms_against_the_float_model():
    model = toy.hf_model("llama")
    gptq = [quant(W2A), {"gptq": {}}]
    base = run(*gptq, model=model)
    qm = run(*gptq, {"norm_tweak": {"steps": 20, "samples": 6, "seq_len": 16}}, model=model)
    st = qm.report["norm_tweak"].stats
    assert st["norm_params"] == 4 and st["blocks"] == 2
    assert all(b["loss_best"] <= b["loss_start"] for b in st["per_block"].values())
    sa, sb = base.graph_module.state_dict(), qm.graph_module.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed and all("layernorm" in k for k in changed)            # weights and scales untouched
    assert op_counts(qm.graph_module) == op_counts(base.graph_module)
    # the teacher is the float model, not the graph's GPTQ-rounded float weights: the start loss is not zero
    assert all(b["loss_start"] > 0 for b in st["per_block"].values())


def test_norm_tweak_options_and_errors():
    qm = run(quant(W2A), {"norm_tweak": {"steps": 5, "data": "calibration", "loss": "mse"}})
    assert qm.report["norm_tweak"].stats["blocks"] == 2
    with pytest.raises(RecipeError, match="seq_len"):
        run(quant(), {"norm_tweak": {"seq_len": 2}})
    gm = qpass.capture(toy.hf_model("llama"), (CALIB[0],))
    with pytest.raises(qpass.QpassError, match="Hugging Face causal LM"):
        qpass.apply(gm, {"passes": [quant(), {"norm_tweak": {"steps": 2}}]}, calib_data=CALIB, progress=False)


def _norm_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "get_attr" and "layernorm" in str(n.target)]


@pytest.mark.parametrize("start_scale", [1.0, 3.0], ids=["tuning_worse", "tuning_better"])
def test_norm_tweak_model_guard_keeps_the_norms_with_the_lower_held_out_kl(start_scale):
    from qpass.passes.norm_tweak import NormTweakConfig, model_guard

    model = toy.hf_model("llama")
    gm = run(quant(W2A), {"gptq": {}}, model=model).graph_module
    norms = _norm_nodes(gm)
    good = [param_of(gm, n).detach().clone() for n in norms]
    # tuning_worse: the start is the float norms and the "tuned" ones are 3x them; tuning_better: the other way round
    start = [v * start_scale for v in good]
    tuned = [v * (3.0 / start_scale) for v in good]
    with torch.no_grad():
        for n, v in zip(norms, tuned):
            param_of(gm, n).copy_(v)
    out = model_guard(gm, model, norms, start, [(x,) for x in CALIB], NormTweakConfig(holdout=0.5))
    assert out["samples"] == 2 and out["selected_on"] == "held-out" and out["metric"] == "kl"
    want = "start" if start_scale == 1.0 else "tuned"
    assert out["kept"] == want and (out["tuned"] < out["start"]) == (want == "tuned")
    kept = start if want == "start" else tuned
    assert all(torch.equal(param_of(gm, n), v) for n, v in zip(norms, kept))


def test_norm_tweak_model_guard_on_text_keeps_the_norms_with_the_lower_next_token_loss():
    from qpass.calibration import run_graph
    from qpass.passes.norm_tweak import NormTweakConfig, _nll, model_guard

    model = toy.hf_model("llama")
    gm = run(quant(W2A), {"gptq": {}}, model=model).graph_module
    norms = _norm_nodes(gm)
    good = [param_of(gm, n).detach().clone() for n in norms]
    text = [(x,) for x in CALIB]
    with torch.no_grad():
        loss = {}
        for name, scale in (("good", 1.0), ("scaled", 3.0)):
            for n, v in zip(norms, good):
                param_of(gm, n).copy_(v * scale)
            loss[name] = _nll(text, [run_graph(gm, x) for x in text])
        # the reference: the same loss by hand, from the model's own logits
        logits = run_graph(gm, text[0])[:, :-1]                            # [batch, T - 1, vocab]
        by_hand = -torch.log_softmax(logits, -1).gather(-1, CALIB[0][:, 1:, None]).mean()
        assert abs(_nll(text[:1], [run_graph(gm, text[0])]) - float(by_hand)) < 1e-5
    assert loss["good"] != loss["scaled"]
    # the graph holds the 3x norms ("tuned", the loop's last values); the start is the unscaled ones
    out = model_guard(gm, model, norms, good, [(x,) for x in CALIB], NormTweakConfig(), text=text)
    assert out["metric"] == "nll" and out["samples"] == len(CALIB) and out["selected_on"] == "calibration text"
    assert out["tuned"] == pytest.approx(loss["scaled"]) and out["start"] == pytest.approx(loss["good"])
    want = "tuned" if loss["scaled"] < loss["good"] else "start"
    assert out["kept"] == want
    assert all(torch.equal(param_of(gm, n), v * (3.0 if want == "tuned" else 1.0)) for n, v in zip(norms, good))


def test_norm_tweak_guard_model_reverts_a_tuning_that_hurts_the_model_and_block_does_not(monkeypatch):
    from qpass.passes import norm_tweak

    def hurt(gm, ctx, method, cfg, **kw):          # a "tuning" that every block would have kept: 3x every norm
        assert kw["block_guard"] == (cfg.guard != "none")
        with torch.no_grad():
            for n in method.norms:
                param_of(gm, n).mul_(3.0)
        return []

    model = toy.hf_model("llama")
    base = run(quant(W2A), {"gptq": {}}, model=model).graph_module.state_dict()
    monkeypatch.setattr(norm_tweak, "train_blocks", hurt)
    tweak = {"steps": 2, "samples": 4, "seq_len": 16}
    qm = run(quant(W2A), {"gptq": {}}, {"norm_tweak": tweak}, model=model)
    g = qm.report["norm_tweak"].stats["guard"]
    # generated data: the whole calibration text is held out from the tuning and scores the two candidates
    assert g["kept"] == "start" and g["start"] < g["tuned"] and g["metric"] == "nll" and g["samples"] == len(CALIB)
    assert next(p for p in qm.plans if p.pass_name == "norm_tweak").decisions["kept"] == "start"
    sd = qm.graph_module.state_dict()
    assert all(torch.equal(base[k], sd[k]) for k in base)
    for guard in ("block", "none"):
        qm = run(quant(W2A), {"gptq": {}}, {"norm_tweak": {**tweak, "guard": guard}}, model=model)
        assert "guard" not in qm.report["norm_tweak"].stats
        sd = qm.graph_module.state_dict()
        assert {k for k in base if not torch.equal(base[k], sd[k])} and all(
            torch.equal(base[k], sd[k]) for k in base if "layernorm" not in k)
    with pytest.raises(RecipeError, match="guard.*model.*block.*none"):
        run(quant(), {"norm_tweak": {"guard": "output"}})


def test_norm_tweak_guard_none_bakes_the_best_step_even_when_the_start_was_better():
    # lr 5 on norm weights near 1: every block's loss ends far above its start; block keeps the start, none does not
    tweak = {"steps": 3, "lr": 5.0, "samples": 4, "seq_len": 16, "keep_best": False}
    model = toy.hf_model("llama")
    per = {g: run(quant(W2A), {"gptq": {}}, {"norm_tweak": {**tweak, "guard": g}}, model=model)
           .report["norm_tweak"].stats["per_block"] for g in ("block", "none")}
    assert all(b["kept"] == "start" and b["loss_best"] == b["loss_start"] for b in per["block"].values())
    assert all(b["kept"] == "trained" and b["loss_best"] > b["loss_start"] for b in per["none"].values())


# ------------------------------------------------------------------------------------------ held-out selection


def test_holdout_split_is_seeded_and_selection_uses_the_held_out_samples():
    from qpass.blockwise import BlockwiseConfig, split_holdout

    train, held = split_holdout(32, BlockwiseConfig(holdout=0.25))
    assert len(held) == 8 and sorted(train + held) == list(range(32))
    assert split_holdout(32, BlockwiseConfig(holdout=0.25)) == (train, held)
    assert split_holdout(32, BlockwiseConfig(holdout=0.25, seed=1)) != (train, held)
    assert split_holdout(1, BlockwiseConfig(holdout=0.5)) == ([0], [])
    assert split_holdout(8, BlockwiseConfig(holdout=0.0)) == (list(range(8)), [])
    qm = run(quant(W2A), {"signround": {"steps": 12, "holdout": 0.5, "holdout_every": 4}})
    per = qm.report["signround"].stats["per_block"].values()
    assert all(b["selected_on"] == "held-out" and b["loss_best"] <= b["loss_start"] for b in per)
    assert all(b["kept"] == "start" or b["best_step"] in (0, 4, 8, 12) for b in per)
    weights_exact(qm.graph_module, qm.report["signround"].stats if any(b["kept"] == "trained" for b in per)
                  else None)
    with pytest.raises(RecipeError, match="holdout"):
        run(quant(), {"signround": {"holdout": 1.0}})


# ----------------------------------------------------------------------------------------------- OmniQuant LET


def _let_setup(family):
    from qpass.calibration import CalibrationSet
    from qpass.pass_infra import Context
    from qpass.passes.omniquant import OmniQuantConfig, let_groups

    qm = run(quant(W4, A4), model=toy.hf_model(family))
    gm = qm.graph_module
    ctx = Context(CalibrationSet(CALIB), progress=False)
    groups, near, edits = let_groups(gm, ctx, OmniQuantConfig())
    return qm, gm, groups, near, edits


def _flat_out(gm, ids):
    out = gm(ids)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_let_folded_with_quantizers_off_is_the_original_function(family):
    from qpass.passes.omniquant import OmniQuantConfig, _LetState, float_view

    qm, gm, groups, near, edits = _let_setup(family)
    kinds = sorted({g.group.producer.kind for g in groups})
    assert len(groups) == 6 and "linear" in kinds             # per block: q/k/v, v -> o, gate/up (fc1)
    assert any("second FFN linear" in n for n in near)          # down_proj / fc2: no LET (the paper)
    assert all(g.z0 is not None for g in groups if g.group.producer.kind != "linear") or family == "llama"
    if family == "llama":                                       # shifts: zero biases on RMSNorms and q/k/v/o/gate/up
        assert edits and any(e[0] == "norm" for e in edits)
    ids = CALIB[0]
    before = _flat_out(float_view(gm), ids)
    sites = [s for s in linear_sites(gm) if Quantizer.of(s.weight_use) is not None]
    st = _LetState(gm, sites, groups, OmniQuantConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, s, z in st.let:
            s.copy_(s * (0.5 + torch.rand(s.shape, generator=g)))
            if z is not None:
                z.add_(torch.randn(z.shape, generator=g))
    st.fold_float(gm)
    after = _flat_out(float_view(gm), ids)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_let_trains_folds_and_lowers_with_parity(family, tmp_path):
    model = toy.hf_model(family)
    rtn = run(quant(W4, A4), model=model)
    qm = run(quant(W4, A4), {"omniquant": {"steps": 20, "holdout": 0}}, model=model)
    st = qm.report["omniquant"].stats
    assert st["let_groups"] == 6 and st["blocks"] == 2 and st["mean_loss_ratio"] < 1.0
    assert all(b["loss_best"] <= b["loss_start"] for b in st["per_block"].values())
    assert (st["biases_added"] > 0) == (family == "llama")
    ops_rtn, ops = op_counts(rtn.graph_module), op_counts(qm.graph_module)
    assert set(ops) == set(ops_rtn)                              # no new op kinds (llama: more adds)
    weights_exact(qm.graph_module, st)
    ids = torch.cat(CALIB)
    assert out_mse(qm, model, ids) < out_mse(rtn, model, ids)
    qm.save(tmp_path / "q")
    back = qpass.load(tmp_path / "q")
    x = toy.token_ids(batch=1, t=9, seed=4)
    torch.testing.assert_close(back(x).logits, qm(x).logits)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(x).logits, qm(x).logits, rtol=1e-5, atol=1e-5)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qpass.lower(qm, "onnx", tmp_path / "o", fused_accuracy_level=0)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "o")), x)
    torch.testing.assert_close(got.float(), qm(x).logits.float(), rtol=1e-4, atol=1e-4)


def test_let_auto_follows_the_paper_and_options_are_checked():
    w = run(quant(W3G), {"omniquant": {"steps": 2}})
    assert w.report["omniquant"].stats["let_groups"] == 0                # weight-only: LWC alone
    forced = run(quant(W3G), {"omniquant": {"steps": 2, "let": True, "lwc": False}})
    assert forced.report["omniquant"].stats["let_groups"] == 6
    none = run(quant(W3G), {"omniquant": {"lwc": False}})
    assert none.report["omniquant"].stats["blocks"] == 0
    with pytest.raises(RecipeError, match="let"):
        run(quant(), {"omniquant": {"let": "sometimes"}})
    with pytest.raises(RecipeError, match="let_alpha"):
        run(quant(), {"omniquant": {"let_alpha": 2.0}})


def _lwc(weights):
    """An LWC quantizer (OmniQuant's sigmoid clip factors) on the first quantized linear of a toy RTN graph."""
    gm = run(quant(weights)).graph_module
    s = next(s for s in linear_sites(gm) if Quantizer.of(s.weight_use))
    return LearnedWeightQuantizer(gm, s, rounding=False, clip="sigmoid")


def test_lwc_on_an_asymmetric_grid_moves_both_clip_factors_and_recomputes_the_zero_point():
    lq = _lwc(W2A)
    assert torch.allclose(torch.sigmoid(lq.a_max), torch.sigmoid(torch.tensor(4.0)))      # the paper's init
    assert torch.allclose(torch.sigmoid(lq.a_min), torch.sigmoid(torch.tensor(4.0)))
    # the zero point (and scale) follow the clipped range: h = (g_max max - g_min min) / 3, z = round(-g_min min / h)
    with torch.no_grad():
        lq.a_min.fill_(-1.0)
    scale, zp = lq.qparams()
    lo, hi = lq.mn * torch.sigmoid(lq.a_min), lq.mx * torch.sigmoid(lq.a_max)
    assert torch.allclose(scale, (hi - lo) / 3)
    assert torch.equal(zp, torch.round(-lo / scale).clamp(0, 3))
    with torch.no_grad():
        lq.a_min.fill_(4.0)
    # gradients of the reconstruction error reach both factors of every group, and differ (independent)
    ((lq.value() - lq.w) ** 2).sum().backward()
    gmin, gmax = lq.a_min.grad, lq.a_max.grad
    assert (gmin != 0).float().mean() > 0.9 and (gmax != 0).float().mean() > 0.9
    assert not torch.allclose(gmin, gmax)
    # a few AdamW steps: the two factors end apart (a symmetric grid would tie them to one scale)
    lq.a_min.grad = lq.a_max.grad = None
    opt = torch.optim.AdamW(lq.params, lr=0.1, weight_decay=0.0)
    for _ in range(30):
        opt.zero_grad()
        ((lq.value() - lq.w) ** 2).sum().backward()
        opt.step()
    g_min, g_max = torch.sigmoid(lq.a_min), torch.sigmoid(lq.a_max)
    assert (g_min < 0.98).any() and (g_max < 0.98).any()
    assert (g_min - g_max).abs().max() > 0.05


def test_lwc_on_a_symmetric_grid_has_one_clip_factor_per_group():
    """h = max(-g_min min, g_max max) / qmax: one of the two factors decides each group's scale (why the
    table's LWC rows use the asymmetric grid, as the paper)."""
    lq = _lwc(W3G)
    ((lq.value() - lq.w) ** 2).sum().backward()
    both = (lq.a_min.grad != 0) & (lq.a_max.grad != 0)
    assert not both.any()


def test_epochs_pass_over_every_training_sample_once_per_epoch():
    from qpass.blockwise import BlockwiseConfig, _batches
    cfg = BlockwiseConfig(epochs=3, batch_size=4)
    batches = _batches([0, 2, 3, 5, 7, 8, 9], cfg, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 3] * 3
    for e in range(3):
        assert sorted(batches[2 * e] + batches[2 * e + 1]) == [0, 2, 3, 5, 7, 8, 9]
    assert batches[0] + batches[1] != batches[2] + batches[3]            # a fresh order each epoch
    assert _batches([0, 1], BlockwiseConfig(), torch.Generator()) == []  # steps mode: each step draws its batch
    qm = run(quant(W2A), {"omniquant": {"epochs": 2, "batch_size": 2, "holdout": 0}})   # 4 samples: 2 per epoch
    assert {b["steps"] for b in qm.report["omniquant"].stats["per_block"].values()} == {4}
    with pytest.raises(RecipeError, match="epochs"):
        run(quant(), {"omniquant": {"epochs": -1}})


# ------------------------------------------------------------------------------------- aug_loss (OmniQuant's)


def test_aug_loss_adds_the_float_block_on_the_student_inputs_as_a_second_target(monkeypatch):
    """The loss has the second term (the float block, quantizers off, on the student's inputs, computed once per
    block before training); on the first block, or with feed: float, it is the same target (the loss doubles)."""
    import qpass.blockwise as B

    seen = []
    real = B._train

    def spy(sweep, step, nodes, inputs, outputs, targets, state, cfg, gm, progress, block_guard=True, aug=None):
        want = None
        if aug is not None:
            with torch.no_grad():
                want = [B._forward(sweep, nodes, env, outputs, {}, float_=True) for env in inputs]
        seen.append((step.index, aug, want, targets, inputs is not None))
        return real(sweep, step, nodes, inputs, outputs, targets, state, cfg, gm, progress, block_guard, aug)

    monkeypatch.setattr(B, "_train", spy)
    model = toy.hf_model("llama")
    om = {"steps": 4, "holdout": 0}
    run(quant(W2A), {"omniquant": om}, model=model)
    assert len(seen) == 2 and all(a is None for _, a, *_ in seen)       # off by default: no second target
    seen.clear()
    on = run(quant(W2A), {"omniquant": {**om, "aug_loss": True}}, model=model)
    assert len(seen) == 2
    (i0, aug0, want0, tg0, _), (i1, aug1, want1, tg1, _) = seen
    assert aug0 is tg0                              # block 0: the student's inputs are the float ones
    for a, w in zip(aug1, want1):                   # block 1: the float block on the quantized block 0's outputs
        for x, y in zip(a, w):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert any(not torch.equal(x, y) for a, t in zip(aug1, tg1) for x, y in zip(a, t))
    # the loss the engine reports is the two-term one: block 0's start loss is twice that without aug_loss
    seen.clear()
    monkeypatch.setattr(B, "_train", real)
    off = run(quant(W2A), {"omniquant": om}, model=model)
    p_on, p_off = (m.report["omniquant"].stats["per_block"]["model.layers.0"] for m in (on, off))
    assert p_on["loss_start"] == pytest.approx(2 * p_off["loss_start"], rel=1e-6)
    p_on, p_off = (m.report["omniquant"].stats["per_block"]["model.layers.1"] for m in (on, off))
    assert p_on["loss_start"] > p_off["loss_start"]


def test_aug_loss_changes_the_result_is_deterministic_and_off_changes_nothing():
    model = toy.hf_model("llama")
    om = {"steps": 10, "holdout": 0}
    base = run(quant(W2A), {"omniquant": om}, model=model)
    off = run(quant(W2A), {"omniquant": {**om, "aug_loss": False}}, model=model)
    on = run(quant(W2A), {"omniquant": {**om, "aug_loss": True}}, model=model)
    again = run(quant(W2A), {"omniquant": {**om, "aug_loss": True}}, model=model)
    sb, so, sn, sa = (m.graph_module.state_dict() for m in (base, off, on, again))
    assert all(torch.equal(sb[k], so[k]) for k in sb)                    # false is the default
    assert all(torch.equal(sn[k], sa[k]) for k in sn)                    # deterministic
    assert any(not torch.equal(sb[k], sn[k]) for k in sb)                # the second term changes what is learned
    weights_exact(on.graph_module, on.report["omniquant"].stats)
    # with feed: float both targets are the float block on float inputs: the loss doubles, Adam's steps do not
    # change with the loss's scale, so (up to rounding) the result is LWC's without it
    ff = {**om, "feed": "float"}
    a = run(quant(W2A), {"omniquant": ff}, model=model).report["omniquant"].stats["per_block"]
    b = run(quant(W2A), {"omniquant": {**ff, "aug_loss": True}}, model=model).report["omniquant"].stats["per_block"]
    assert all(b[k]["loss_start"] == pytest.approx(2 * a[k]["loss_start"], rel=1e-6) for k in a)


def test_aug_loss_with_let_trains_and_a_bad_value_is_a_recipe_error():
    model = toy.hf_model("opt")
    rtn = run(quant(W2A), model=model)
    qm = run(quant(W2A), {"omniquant": {"steps": 10, "holdout": 0, "let": True, "aug_loss": True}}, model=model)
    st = qm.report["omniquant"].stats
    assert st["let_groups"] == 6 and st["blocks"] == 2
    weights_exact(qm.graph_module, st)
    ids = torch.cat(CALIB)
    assert out_mse(qm, model, ids) < out_mse(rtn, model, ids)
    for bad in ("yes", 1, None):
        with pytest.raises(RecipeError, match="aug_loss"):
            run(quant(), {"omniquant": {"aug_loss": bad}})
    from qpass.blockwise import BlockwiseConfig
    with pytest.raises(RecipeError, match="aug_loss"):
        BlockwiseConfig(aug_loss="true")
