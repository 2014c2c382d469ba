import functools
import os
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch.nn import functional as F

import qpass
from qpass import Recipe
from qpass.qat.datagen import GenerationSettings, generate_data, hf_step
from qpass.generate import generate
from qpass.graph import META_QUANT
from qpass.passes import QatConfig
from qpass.qat.training import Trainer, TrainSettings, distill_loss
from tests import toy

W4A8 = {"quantize": {"weights": {"bits": 4, "granularity": "per_channel"},
                     "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}}}


def peaky_llama(seed=0):
    """A random tiny Llama with confident predictions (so distillation has something to fix)."""
    model = toy.hf_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def test_generation_greedy_prefix_then_sampling():
    model = toy.hf_model("llama")
    s = GenerationSettings(samples=6, seq_len=12, greedy_lengths=(3, 5), batch_size=4, seed=0)
    a = generate_data(model, s, progress=False)
    assert a.shape == (6, 12)
    assert torch.equal(a, generate_data(model, s, progress=False))          # seeded: deterministic
    b = generate_data(model, GenerationSettings(**{**s.__dict__, "seed": 1}), progress=False)
    assert not torch.equal(a, b)
    # rows come grouped by greedy length: 3 start tokens x j=3, then the same 3 x j=5
    for row, j in zip(a, [3, 3, 3, 5, 5, 5]):
        greedy = generate(hf_step(model), row[:1].unsqueeze(0), j - 1)[0]
        assert torch.equal(row[:j], greedy)                                  # first j tokens are top-1
    assert torch.equal(a[:3, 0], a[3:, 0])                                   # same start tokens


def test_generated_data_is_cached_and_reused(tmp_path):
    model = toy.hf_model("llama")
    s = GenerationSettings(samples=3, seq_len=6, greedy_lengths=(3,), seed=0)
    a = generate_data(model, s, cache_dir=str(tmp_path), model_id="toy", progress=False)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors")
    with torch.no_grad():
        model.lm_head.weight.zero_()                     # a cache hit must not call the model
    assert torch.equal(generate_data(model, s, cache_dir=str(tmp_path), model_id="toy", progress=False), a)


def test_distill_loss_hand_case():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert distill_loss(s, t) == pytest.approx(float(kl), rel=1e-6)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    ids = torch.tensor([[0, 1]])
    mixed = distill_loss(s, t, ids, ce_weight=0.25)
    ce = F.cross_entropy(s[0, :1], ids[0, 1:])
    assert mixed == pytest.approx(float(0.75 * kl + 0.25 * ce), rel=1e-6)


def test_unquantized_student_has_zero_loss():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, Recipe([]))
    ids = toy.token_ids(2, 9)
    loss = distill_loss(qm(ids).logits, model(ids).logits)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_weights_and_learnable_scales():
    from qpass.passes.qat import make_scales_learnable

    qm = qpass.apply(toy.hf_model("llama"), {"passes": [W4A8]})
    gm = qm.graph_module
    scales = make_scales_learnable(gm)
    assert len(scales) == 15
    loss = qm(toy.token_ids()).logits.pow(2).mean()
    loss.backward()
    w = gm.get_parameter("model.model.layers.0.mlp.down_proj.weight")
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(s.grad is not None for s in scales) and sum(float(s.grad.abs().sum()) for s in scales) > 0


def test_qat_pass_lowers_the_distillation_loss_and_keeps_structure(tmp_path):
    model = peaky_llama()
    qat = {"qat": {"samples": 16, "seq_len": 24, "steps": 12, "batch_size": 8, "lr": 3e-4, "cache_dir": None,
                   "seed": 0}}
    rtn = qpass.apply(model, {"passes": [W4A8]})
    qm = qpass.apply(model, {"passes": [W4A8, qat]}, progress=False)
    stats = qm.report["qat"].stats
    assert stats["last_loss"] < stats["first_loss"]
    assert qm.report["qat"].nodes_added == 0
    held_out = toy.token_ids(4, 24, seed=99)
    with torch.no_grad():
        ref = model(held_out).logits
        assert distill_loss(qm(held_out).logits, ref) < distill_loss(rtn(held_out).logits, ref)
    qm.save(tmp_path / "m")                                   # trained weights survive save/load exactly
    assert torch.equal(qpass.load(tmp_path / "m")(held_out).logits, qm(held_out).logits)


def _weight_codes(gm, name):
    """round(W / s) of the weight quantizer reading parameter ``name`` (per-channel, symmetric)."""
    node = next(n for n in gm.graph.nodes if n.meta.get(META_QUANT, {}).get("role") == "weight"
                and n.args[0].target == name)
    scale = functools.reduce(getattr, node.args[1].target.split("."), gm)
    w = gm.get_parameter(name)
    return torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))), scale.detach().clone()


@pytest.mark.parametrize("base", ["packed", "float"])
def test_peqa_trains_only_scales(base):
    model = peaky_llama()
    name = "model.model.layers.0.mlp.down_proj.weight"
    rtn = qpass.apply(model, {"passes": [W4A8]}).graph_module
    rec = {"passes": [W4A8, {"qat": {"samples": 8, "seq_len": 16, "steps": 3, "batch_size": 4, "lr": 2e-4,
                                     "trainable": "scales", "cache_dir": None, "base": base}}]}
    qm = qpass.apply(model, rec, progress=False)
    gm = qm.graph_module
    assert qm.report["qat"].stats["trainable_tensors"] == 15
    assert qm.report["qat"].stats["base"] == base and qm.report["qat"].stats["kept_step"] > 0
    scale_nodes = [n for n in gm.graph.nodes if n.meta.get(META_QUANT, {}).get("role") == "weight"]
    assert all(n.args[1].target in dict(gm.named_parameters()) for n in scale_nodes)
    codes0, scale0 = _weight_codes(rtn, name)
    codes1, scale1 = _weight_codes(gm, name)
    assert not torch.equal(scale0, scale1)                   # the scales trained
    if base == "float":                                      # the float weight is untouched
        assert torch.equal(gm.get_parameter(name), model.model.layers[0].mlp.down_proj.weight)
    else:                                                    # PEQA: the integer codes are frozen, W = s' q
        assert torch.equal(codes1, codes0)
        torch.testing.assert_close(gm.get_parameter(name), codes0 * scale1.reshape(-1, 1))


def test_config_errors_name_their_path():
    with pytest.raises(qpass.RecipeError, match=r"passes\[0\]\.qat\.grad_accum"):
        Recipe.from_dict({"passes": [{"qat": {"batch_size": 8, "grad_accum": 3}}]})
    with pytest.raises(qpass.RecipeError, match=r"passes\[0\]\.qat\.trainable.*did you mean 'scales'"):
        Recipe.from_dict({"passes": [{"qat": {"trainable": "scale"}}]})
    with pytest.raises(qpass.RecipeError, match=r"passes\[0\]\.qat\.base.*parallel: fsdp"):
        Recipe.from_dict({"passes": [{"qat": {"base": "packed", "parallel": "fsdp"}}]})
    with pytest.raises(qpass.CalibrationError, match="teacher"):
        qm = qpass.apply(toy.hf_model("llama"), {"passes": [W4A8]})
        qpass.apply(qm, Recipe([QatConfig(steps=1, samples=2, seq_len=8, batch_size=2)]))


# ----------------------------------------------------------------------------- trainer mechanics


def one_step(steps_before: int = 0, parallel: str = "ddp"):
    """The shared single-step scenario (also run by tests/helpers/ddp_qat_step.py under torchrun): the loss, the
    gradients (whole tensors, gathered under FSDP) and, after the trainer closes, the module's parameters."""
    model = peaky_llama()
    qm = qpass.apply(model, {"passes": [W4A8]}, progress=False)
    data = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(5))
    params = [p for p in qm.graph_module.parameters()]
    trainer = Trainer(qm.graph_module, lambda ids: model(input_ids=ids, use_cache=False), data, params,
                      TrainSettings(steps=4, batch_size=8, lr=1e-3, seed=0, parallel=parallel), progress=False)
    loss = trainer.train_step()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {n: full(p.grad.detach()).clone() for n, p in qm.graph_module.named_parameters() if p.grad is not None}
    trainer.close()
    after = {n: p.detach().clone() for n, p in qm.graph_module.named_parameters()}
    return loss, grads, after


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, parallel):
    out = tmp_path / f"{parallel}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    with socket.socket() as sk:                  # a free port (a fixed one can still be taken, or in TIME_WAIT)
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "tests/helpers/ddp_qat_step.py",
                          str(out), parallel], env=env, timeout=300, capture_output=True)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    got = safetensors.torch.load_file(str(out))
    loss, grads, after = one_step()
    assert float(got["loss"]) == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == {k[5:] for k in got if k.startswith("grad.")}
    for k, g in grads.items():
        torch.testing.assert_close(got[f"grad.{k}"], g, rtol=1e-4, atol=1e-7)
    assert after.keys() == {k[6:] for k in got if k.startswith("after.")}
    for k, v in after.items():                               # the step taken, gathered back into a plain module
        torch.testing.assert_close(got[f"after.{k}"], v, rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_gives_the_same_next_loss(tmp_path):
    def trainer():
        model = peaky_llama()
        qm = qpass.apply(model, {"passes": [W4A8]}, progress=False)
        data = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(5))
        return Trainer(qm.graph_module, lambda ids: model(input_ids=ids, use_cache=False), data,
                       list(qm.graph_module.parameters()), TrainSettings(steps=6, batch_size=4, lr=1e-3),
                       progress=False)

    a = trainer()
    for _ in range(3):
        a.train_step()
    a.save_checkpoint(str(tmp_path))
    expected = a.train_step()
    b = trainer()
    assert b.load_checkpoint(str(tmp_path)) and b.step == 3
    assert b.train_step() == pytest.approx(expected, rel=1e-6)


def test_a_qat_model_lowers_to_both_backends_with_its_trained_weights_and_scales(tmp_path):
    model = peaky_llama()
    rec = {"passes": [W4A8, {"qat": {"samples": 8, "seq_len": 16, "steps": 3, "batch_size": 4, "lr": 1e-3,
                                     "learnable_scales": True, "cache_dir": None, "held_out": 0}}]}
    qm = qpass.apply(model, rec, progress=False)     # held_out 0: the trained weights, whatever they score
    rtn = qpass.apply(model, {"passes": [W4A8]}, progress=False)
    x = toy.token_ids(2, 12, seed=7)
    with torch.no_grad():
        ref = qm(x).logits
        assert not torch.allclose(ref, rtn(x).logits)            # training changed the model
        packed = qpass.lower(qm, "torch", kernels="exact")
        torch.testing.assert_close(packed(x).logits, ref, atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    art = qpass.lower(qm, "onnx", tmp_path / "onnx", w4a8="qdq")   # the exact (unfused) W4A8 form
    torch.testing.assert_close(onnx_qdq.logits(art.path, x), ref, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------- intermediate-output distillation


def test_module_outputs_are_the_decoder_layers_hidden_states():
    from qpass.qat.distill import feature_taps, module_outputs

    model = toy.hf_model("llama")
    gm = qpass.capture(model)
    before = len(gm.graph.nodes)
    outs = module_outputs(gm, ["model.layers.*"], "qat.intermediate")
    assert list(outs) == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    x = toy.token_ids(2, 9)
    with torch.no_grad(), feature_taps(gm, model, outs) as (student, teacher):
        gm(x)
        hidden = model(x, output_hidden_states=True).hidden_states
        for i, path in enumerate(outs):
            torch.testing.assert_close(student[path], teacher[path])
            if i + 1 < len(outs):                              # the last one is normed in hidden_states
                torch.testing.assert_close(teacher[path], hidden[i + 1])
    assert len(gm.graph.nodes) == before and not [m for m in dict(gm.named_modules()) if "_qpass_feature" in m]


@pytest.mark.parametrize("family,prefix", [("llama", "model.layers"), ("opt", "model.decoder.layers"),
                                           ("gpt2", "transformer.h")])
def test_intermediate_blocks_are_the_decoder_blocks_of_any_architecture(family, prefix):
    from qpass.qat.distill import BLOCKS, module_outputs

    model = toy.hf_model(family)
    gm = qpass.capture(model)
    outs = module_outputs(gm, [BLOCKS], "qat.intermediate")
    assert list(outs) == [f"{prefix}.{i}" for i in range(model.config.num_hidden_layers)]
    assert outs == module_outputs(gm, [f"{prefix}.*"], "qat.intermediate")


def test_intermediate_blocks_on_a_graph_without_blocks_is_a_recipe_error():
    from qpass.qat.distill import module_outputs

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    with pytest.raises(qpass.errors.RecipeError, match=r"qat.intermediate\[0\].*no decoder blocks"):
        module_outputs(gm, ["blocks"], "qat.intermediate")


def test_intermediate_distillation_trains_and_its_errors_name_the_path():
    model = peaky_llama()
    qat = {"samples": 16, "seq_len": 16, "steps": 6, "batch_size": 8, "lr": 3e-4, "cache_dir": None, "seed": 0}
    plain = qpass.apply(model, {"passes": [W4A8, {"qat": qat}]}, progress=False)
    feat = qpass.apply(model, {"passes": [W4A8, {"qat": {**qat, "intermediate": ["model.layers.*"],
                                                         "intermediate_weight": 5.0}}]}, progress=False)
    stats = feat.report["qat"].stats
    assert stats["intermediate"] == ["model.layers.0", "model.layers.1"]
    assert stats["first_loss"] > plain.report["qat"].stats["first_loss"]   # the feature term is in the loss
    assert stats["last_loss"] < stats["first_loss"] and feat.report["qat"].nodes_added == 0
    with pytest.raises(qpass.errors.TargetNotFoundError, match=r"qat.intermediate\[0\]"):
        qpass.apply(model, {"passes": [W4A8, {"qat": {**qat, "intermediate": ["model.layerz.*"]}}]},
                    progress=False)
    with pytest.raises(qpass.errors.RecipeError, match="intermediate_weight"):
        Recipe.from_dict({"passes": [{"qat": {"intermediate": ["model.layers.*"], "intermediate_weight": -1}}]})


# -- best step: a held-out split scored during training; the best point (the start included) is kept


def test_held_out_split_is_seeded_disjoint_and_complete():
    from qpass.passes.qat import split_held_out

    data = torch.arange(40).view(20, 2)
    train, held = split_held_out(data, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    rows = sorted(map(tuple, torch.cat([train, held]).tolist()))
    assert rows == sorted(map(tuple, data.tolist()))
    again = split_held_out(data, 0.25, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    assert split_held_out(data, 0.0, seed=3)[1] is None
    assert split_held_out(data[:1], 0.5, seed=3)[1] is None            # nothing left to train on otherwise
    assert len(split_held_out(data[:2], 0.01, seed=3)[1]) == 1         # at least one held out


def _qat(**kw):
    return {"qat": {"samples": 20, "seq_len": 16, "steps": 8, "batch_size": 4, "cache_dir": None, "seed": 0,
                    "held_out": 0.2, "eval_every": 2, **kw}}


def test_qat_never_hands_back_a_model_worse_than_its_start_on_held_out_data():
    model = peaky_llama()
    start = qpass.apply(model, {"passes": [W4A8]})
    bad = qpass.apply(model, {"passes": [W4A8, _qat(lr=0.5, grad_clip=None)]}, progress=False)   # diverges
    stats = bad.report["qat"].stats
    curve = stats["held_out_curve"]
    assert [s for s, _ in curve] == [0, 2, 4, 6, 8] and stats["held_out"] == 4
    assert min(v for s, v in curve if s > 0) > curve[0][1], "this lr must make the held-out loss worse"
    assert stats["best_step"] == 0 and stats["kept_step"] == 0
    ids = toy.token_ids(2, 16, seed=5)
    assert torch.equal(bad(ids).logits, start(ids).logits)              # the start, exactly
    # without keep_best the diverged weights are handed back
    kept = qpass.apply(model, {"passes": [W4A8, _qat(lr=0.5, grad_clip=None, keep_best=False)]}, progress=False)
    assert kept.report["qat"].stats["kept_step"] == 8
    assert not torch.equal(kept(ids).logits, start(ids).logits)


def test_qat_keeps_an_improving_step_and_held_out_zero_is_the_paper_setting():
    model = peaky_llama()
    good = qpass.apply(model, {"passes": [W4A8, _qat(lr=3e-4)]}, progress=False).report["qat"].stats
    assert good["best_held_out_loss"] < good["start_held_out_loss"] and good["best_step"] > 0
    off = qpass.apply(model, {"passes": [W4A8, _qat(lr=3e-4, held_out=0)]}, progress=False).report["qat"].stats
    assert "held_out_curve" not in off and off["samples"] == 20
    with pytest.raises(qpass.RecipeError, match=r"qat\.held_out"):
        Recipe.from_dict({"passes": [_qat(held_out=0.9)]})


def test_a_resumed_run_keeps_its_held_out_curve_and_best_point(tmp_path):
    model = peaky_llama()
    ck = str(tmp_path / "ck")
    full = qpass.apply(model, {"passes": [W4A8, _qat(lr=3e-4)]}, progress=False)
    qpass.apply(model, {"passes": [W4A8, _qat(lr=3e-4, steps=8, checkpoint_dir=ck, checkpoint_every=4)]},
                progress=False)
    # a checkpoint at step 8 exists now; resuming from it trains nothing more and keeps the same best point
    again = qpass.apply(model, {"passes": [W4A8, _qat(lr=3e-4, checkpoint_dir=ck, checkpoint_every=4)]},
                        progress=False)
    ids = toy.token_ids(2, 16, seed=5)
    assert again.report["qat"].stats["held_out_curve"] == full.report["qat"].stats["held_out_curve"]
    assert torch.equal(again(ids).logits, full(ids).logits)


def test_fsdp_close_gives_back_a_plain_module_with_tied_weights_tied():
    """Fsdp (one gloo rank) shards a tied-embedding graph and gathers it back: same class, same function, the
    tied parameter shared again, no FSDP hooks left."""
    import torch.distributed as dist

    from qpass.qat.training import Fsdp

    qm = qpass.apply(toy.hf_model("llama_tied"), {"passes": [W4A8]}, progress=False)
    gm = qm.graph_module
    ids = toy.token_ids(2, 8, seed=3)
    with torch.no_grad():
        ref = qm(ids).logits
    cls, hooks = type(gm), (dict(gm._forward_pre_hooks), dict(gm._forward_hooks))
    tied = {n for n, _ in gm.named_parameters(remove_duplicate=False)} - {n for n, _ in gm.named_parameters()}
    assert tied                                            # the toy really ties lm_head to the embedding
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29519", rank=0, world_size=1)
    try:
        f = Fsdp(gm, [p for p in gm.parameters()], 1)
        assert type(gm) is not cls and all(hasattr(p, "full_tensor") for p in f.params)
        f.close()
    finally:
        dist.destroy_process_group()
    assert type(gm) is cls and (dict(gm._forward_pre_hooks), dict(gm._forward_hooks)) == hooks
    assert all(type(p) is torch.nn.Parameter for p in gm.parameters())
    assert tied == {n for n, _ in gm.named_parameters(remove_duplicate=False)} - {n for n, _ in gm.named_parameters()}
    with torch.no_grad():
        assert torch.equal(qm(ids).logits, ref)


def test_a_tap_the_teacher_lacks_is_a_recipe_error():
    from qpass.qat.distill import feature_taps, module_outputs

    model = toy.hf_model("llama")
    gm = qpass.capture(model)
    outs = module_outputs(gm, ["model.layers.0"], "qat.intermediate")
    with pytest.raises(qpass.errors.RecipeError, match="the teacher has no module 'model.layerz.0'"):
        with feature_taps(gm, model, {"model.layerz.0": outs["model.layers.0"]}):
            pass
    assert not [m for m in dict(gm.named_modules()) if "_qpass_feature" in m]
