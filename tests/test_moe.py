"""Mixture-of-experts models: stacked expert weights found from the graph and quantized per expert, routers kept
float and reported, plans re-applied on load, both backends lower or refuse by name."""
from __future__ import annotations

import pytest
import torch
import transformers

import qpass
from qpass.errors import UnsupportedOpError
from qpass.experts import expert_sites, routers
from qpass.quantizer import quantizers

from . import toy

FAMILIES = ("mixtral", "qwen2_moe")
_COMMON = dict(vocab_size=96, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


def moe_config(family: str):
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **_COMMON)
    if family == "qwen2_moe":   # also a shared expert (plain linears) with a sigmoid gate
        return transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24,
                                           shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2,
                                           **_COMMON)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                           num_experts_per_tok=2, head_dim=8, **_COMMON)
    raise KeyError(family)


_CAPTURED: dict = {}


def captured(family: str):
    if family not in _CAPTURED:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(moe_config(family)).eval()
        _CAPTURED[family] = (model, qpass.capture(model))
    return _CAPTURED[family]


def W(bits=4, **gran):
    gran = gran or {"granularity": "per_group", "group_size": 8}
    return {"version": 1, "passes": [{"quantize": {"weights": {"bits": bits, **gran}, "ignore": ["lm_head"]}}]}


def logits(m, x):
    with torch.no_grad():
        out = m(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_moe"])
def test_expert_weights_and_routers_found_from_the_graph(family):
    model, gm = captured(family)
    sites = expert_sites(gm)
    stacked = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert sorted(s.key for s in sites) == sorted(stacked)
    for s in sites:                               # [E, out, in]: the input features are the last axis
        e, out, inp = stacked[s.key].shape
        assert s.experts == e == 4 and s.in_axis == 2 and s.path.endswith("mlp.experts")
    assert routers(gm) == [f"model.layers.{i}.mlp.gate" for i in range(2)]


def test_dense_models_have_no_experts_or_routers():
    _, gm = toy.captured("llama")
    assert expert_sites(gm) == [] and routers(gm) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_quantizes_every_expert_and_reports_them(family):
    model, gm = captured(family)
    x = toy.token_ids()
    qm = qpass.apply(gm, W(), progress=False)
    stats = qm.report.rows[0].stats
    assert stats["expert_weights"] == 4 and stats["experts"] == 16 and stats["routers_float"] == 2
    experts = [q for q in quantizers(qm.graph_module, role="weight") if ".experts." in q.path]
    assert len(experts) == 4
    for q in experts:                         # per expert, per row, groups of 8 along the input features
        scale = getattr(qm.graph_module, q.scale.target)
        w = model.get_parameter(q.path)
        assert tuple(q.block) == (1, 1, 8) and scale.shape == (w.shape[0], w.shape[1], w.shape[2] // 8)
    paths = {q.path for q in quantizers(qm.graph_module, role="weight")}
    assert not any(p.endswith("mlp.gate") for p in paths)          # routers float ...
    assert any("MoE router" in m for m in qm.report.rows[0].near_misses)   # ... and said so
    err = (logits(qm, x) - logits(model, x)).abs().max()
    assert 0 < err < 0.2
    # the experts alone change the output (they are applied, not just recorded)
    only = qpass.apply(gm, {"version": 1, "passes": [{"quantize": {"weights": {"bits": 4, "granularity": "per_group",
                                                                               "group_size": 8},
                                                                   "targets": ["*.experts.*"]}}]}, progress=False)
    assert only.report.rows[0].stats["linears"] == 0
    assert (logits(only, x) - logits(model, x)).abs().max() > 1e-4


def test_expert_fake_quant_is_per_expert_rtn():
    model, gm = captured("mixtral")
    qm = qpass.apply(gm, W(8, granularity="per_channel"), progress=False)
    q = next(q for q in quantizers(qm.graph_module, role="weight") if q.path.endswith("experts.down_proj"))
    w = model.get_parameter(q.path).detach()
    scale = getattr(qm.graph_module, q.scale.target)
    ref = w.amax(-1, keepdim=True).maximum(-w.amin(-1, keepdim=True)) / 127     # per expert, per row
    torch.testing.assert_close(scale, ref)


def test_routers_true_quantizes_them():
    _, gm = captured("mixtral")
    r = W()
    r["passes"][0]["quantize"]["routers"] = True
    qm = qpass.apply(gm, r, progress=False)
    assert {f"model.layers.{i}.mlp.gate" for i in range(2)} <= {q.path for q in quantizers(qm.graph_module)}
    assert qm.report.rows[0].stats["routers_float"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_applies_the_expert_plan(tmp_path, family):
    model, _ = captured(family)
    x = toy.token_ids()
    qm = qpass.apply(model, W(), progress=False)
    qm.save(tmp_path / "q")
    back = qpass.load(tmp_path / "q")
    assert torch.equal(logits(back, x), logits(qm, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_lower_or_refuse_by_name(tmp_path, family):
    model, gm = captured(family)
    x = toy.token_ids()
    # attention-only quantization: the torch backend lowers it with the experts in float (parity)
    attn = qpass.apply(model, {"version": 1, "passes": [{"quantize": {
        "weights": {"bits": 4, "granularity": "per_group", "group_size": 8}, "ignore": ["lm_head", "*.experts.*"]}}]},
        progress=False)
    pm = qpass.lower(attn, "torch")
    torch.testing.assert_close(logits(pm, x), logits(attn, x), rtol=0, atol=1e-5)
    # ONNX: the experts' grouped matmul is transformers' custom op: refused by name, not a torch.onnx error
    with pytest.raises(UnsupportedOpError, match=r"grouped_mm_fallback.*mixture-of-experts") as e:
        qpass.lower(attn, "onnx", tmp_path / "onnx")
    assert "mlp.experts" in str(e.value)
    # quantized experts: stored as codes + per-expert scales (no float copy), dequantized for the grouped matmul:
    # the fake-quant model's outputs bit for bit, through save/load and the decode graph (generate)
    qm = qpass.apply(model, W(), progress=False)
    pm = qpass.lower(qm, "torch")
    assert torch.equal(logits(pm, x), logits(qm, x))
    bufs = dict(pm.named_buffers())
    codes = [b for n, b in bufs.items() if n.endswith("experts.down_proj_packed.codes")]
    assert len(codes) == 2 and codes[0].dtype == torch.int8 and codes[0].shape[0] == 4
    assert not any(n.endswith("experts.down_proj") for n, _ in pm.named_parameters())   # float weight dropped
    pm.save(tmp_path / "pm")
    from qpass.backends import torch_packed

    assert torch.equal(logits(torch_packed.load(tmp_path / "pm"), x), logits(qm, x))
    assert torch.equal(pm.generate(x[:1], max_new_tokens=4), qm.generate(x[:1], max_new_tokens=4))
    # quantized expert inputs (W8A8 on the experts) are not lowered: refused by name
    a8 = qpass.apply(gm, {"version": 1, "passes": [{"quantize": {
        "weights": {"bits": 8, "granularity": "per_channel"},
        "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}]},
        progress=False)
    with pytest.raises(UnsupportedOpError, match=r"mlp\.experts"):
        qpass.lower(a8, "torch")


# ------------------------------------------------------------------ GPTQ / AWQ: per-expert statistics


def _calib(n=8, t=32):
    return [torch.randint(0, 96, (1, t), generator=torch.Generator().manual_seed(i)) for i in range(n)]


Q3 = {"quantize": {"weights": {"bits": 3, "granularity": "per_group", "group_size": 8}, "ignore": ["lm_head"]}}


def _mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_rerounds_every_expert_with_its_own_hessian(family):
    model, gm = captured(family)
    x = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(99))
    rtn = qpass.apply(gm, {"version": 1, "passes": [Q3]}, progress=False)
    g = qpass.apply(gm, {"version": 1, "passes": [Q3, {"gptq": {}}]}, calib_data=_calib(), progress=False)
    stats = g.report.rows[1].stats
    assert stats["experts"] == 16 and stats["experts_kept_rtn"] == 0
    per_expert = {k: v for k, v in stats["errors"].items() if "[" in k}
    assert len(per_expert) == 16 and all(v["ratio"] <= 1.0 + 1e-9 for v in per_expert.values())
    # each expert's Hessian counts the rows routed to it: top-2 of 4 experts, 8 x 32 tokens -> 512 rows per weight
    for key in {k.split("[")[0] for k in per_expert}:
        assert sum(v["tokens"] for k, v in per_expert.items() if k.startswith(key + "[")) == 8 * 32 * 2
    # re-rounded weights stay on the grid (the fake-quant is exact on them) and the output error drops
    f = logits(model, x)
    assert _mse(logits(g, x), f) < _mse(logits(rtn, x), f)
    ws = {q.path: q for q in quantizers(g.graph_module, role="weight") if ".experts." in q.path}
    gmq = g.graph_module
    for path, q in ws.items():
        w = gmq.get_parameter(q.x.target)
        args = [gmq.get_buffer(a.target) if isinstance(a, torch.fx.Node) else a for a in q.node.args[1:]]
        torch.testing.assert_close(q.node.target(w, *args), w, rtol=0, atol=1e-6)


def test_gptq_experts_with_too_few_tokens_keep_rtn_and_say_so():
    _, gm = captured("mixtral")
    rtn = qpass.apply(gm, {"version": 1, "passes": [Q3]}, progress=False)
    g = qpass.apply(gm, {"version": 1, "passes": [Q3, {"gptq": {"min_expert_tokens": 10 ** 6}}]},
                    calib_data=_calib(2, 8), progress=False)
    stats = g.report.rows[1].stats
    assert stats["experts_kept_rtn"] == 16 and stats.get("experts", 0) == 0
    reasons = [m for m in g.report.rows[1].near_misses if "min_expert_tokens" in m]
    assert len(reasons) == 16 and "experts.gate_up_proj[0]" in reasons[0] and "calibration tokens" in reasons[0]
    q = next(q for q in quantizers(g.graph_module, role="weight") if q.path.endswith("experts.down_proj"))
    assert torch.equal(g.graph_module.get_parameter(q.x.target), rtn.graph_module.get_parameter(q.x.target))


def test_gptq_experts_save_and_load(tmp_path):
    model, _ = captured("qwen2_moe")
    x = toy.token_ids()
    g = qpass.apply(model, {"version": 1, "passes": [Q3, {"gptq": {}}]}, calib_data=_calib(), progress=False)
    g.save(tmp_path / "g")
    assert torch.equal(logits(qpass.load(tmp_path / "g"), x), logits(g, x))


def test_awq_clips_each_expert_on_its_own_tokens():
    model, gm = captured("mixtral")
    a = qpass.apply(gm, {"version": 1, "passes": [{"awq": {}}, Q3]}, calib_data=_calib(), progress=False)
    stats = a.report.rows[0].stats
    assert stats["experts_clipped"] == 16
    per_expert = {k: v for k, v in stats["clip_loss_vs_unclipped"].items() if k.endswith("]")}
    assert len(per_expert) == 16 and all(v <= 1.0 for v in per_expert.values())   # no clip is a candidate
    notes = [m for m in a.report.rows[0].near_misses if "MoE experts (4)" in m]
    assert len(notes) == 4 and all("not scaled" in m and "clipped per expert" in m for m in notes)
    # too few routed rows: left unclipped and said so; before gptq (clip: auto): not clipped, said so
    few = qpass.apply(gm, {"version": 1, "passes": [{"awq": {}}, Q3]}, calib_data=_calib(1, 8), progress=False)
    assert any("calibration tokens < 32; not clipped" in m for m in few.report.rows[0].near_misses)
    auto = qpass.apply(gm, {"version": 1, "passes": [{"awq": {}}, Q3, {"gptq": {}}]}, calib_data=_calib(),
                       progress=False)
    assert "experts_clipped" not in auto.report.rows[0].stats
    assert any("clip search off" in m and "experts" in m for m in auto.report.rows[0].near_misses)


# ------------------------------------------------------------------ apply_from_disk: experts stored one by one


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_from_disk_streams_a_moe_model(tmp_path, family):
    """save_pretrained stores each expert's projections as separate tensors (experts.0.w1.weight, ...); the
    stream reads them through transformers' own conversion (stack, concatenate) into the stacked parameter, and
    the result is bit-identical to qpass.apply in memory, GPTQ per expert included."""
    model, _ = captured(family)
    model.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert any(".experts.0." in k for k in f.keys())           # stored per expert, not stacked
    recipe = {"version": 1, "passes": [Q3, {"gptq": {}}]}
    x = toy.token_ids()
    mem = qpass.apply(model, recipe, calib_data=_calib(), progress=False)
    qpass.apply_from_disk(tmp_path / "hf", recipe, tmp_path / "out", calib_data=_calib(), progress=False)
    disk = qpass.load(tmp_path / "out")
    assert torch.equal(logits(disk, x), logits(mem, x))


def test_weight_bytes_count_the_experts():
    from qpass.eval import weight_bytes

    model, gm = captured("mixtral")
    qm = qpass.apply(gm, W(), progress=False)
    stacked = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    fp, q = weight_bytes(gm), weight_bytes(qm)
    assert fp["linear_weights"] == q["linear_weights"] > stacked        # experts counted with the linears
    assert q["quantized_bits_per_weight"] == 4 + 16 / 8                  # int4 codes + an fp16 scale per 8
