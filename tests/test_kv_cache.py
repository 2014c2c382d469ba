import re

import pytest
import torch

import qpass
from qpass import FloatFormat, IntFormat, PerChannel, PerHead, PerToken, QSpec, Recipe
from qpass.calibration import CalibrationSet, observe
from qpass.graph import META_QUANT, linear_sites, op_counts
from qpass.pass_infra import Context, Pipeline
from qpass.passes import KvCache, KvCacheConfig, QuantizeConfig, SmoothQuantConfig
from tests import toy

FQ, FQD = "qpass.fake_quantize.default", "qpass.fake_quantize_dynamic.default"
CALIB = [toy.token_ids(seed=s) for s in range(2)]
KIVI4 = dict(keys=QSpec(IntFormat(4), PerChannel(-1)), values=QSpec(IntFormat(4), PerHead(per_token=True),
                                                                    dynamic=True))


def kv_nodes(gm):
    return [n for n in gm.graph.nodes if n.meta.get(META_QUANT, {}).get("role") in ("key", "value")]


def rel(a, b):
    return float(((a - b).abs().mean() / b.abs().mean()).detach())


@pytest.mark.parametrize("family", toy.FAMILIES + toy.FUSED_FAMILIES)
def test_int8_kv_fires_on_every_family_and_stays_close(family):
    gm = toy.captured(family)[1]
    ids = toy.token_ids(batch=2, t=9, seed=11)
    qm = qpass.apply(gm, Recipe([KvCacheConfig()]), progress=False)
    assert qm.report["kv_cache"].stats == {"attention_sites": 2, "keys_quantized": 2, "values_quantized": 2,
                                           "cache_writes": 0}
    nodes = kv_nodes(qm.graph_module)
    assert op_counts(qm.graph_module)[FQD] == 4 and len(nodes) == 4
    for n in nodes:            # on the kv-head tensor [batch, kv_heads, seq, head_dim], one scale per token
        assert n.meta["val"].dim() == 4 and list(n.args[1]) == [1, -1, 1, -1]
    assert 0 < rel(qm(ids).logits.detach(), gm(ids).logits.detach()) < 0.01


def test_k_is_taken_after_rope_and_v_before_repeat_kv():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig()]), progress=False)
    role = {n.meta[META_QUANT]["role"]: n for n in kv_nodes(qm.graph_module) if ".0." in n.meta[META_QUANT]["path"]}
    k, v = role["key"], role["value"]
    assert k.args[0].target == torch.ops.aten.add.Tensor                 # q*cos + rotate_half(q)*sin
    assert v.args[0].target == torch.ops.aten.transpose.int              # v_proj -> view -> transpose
    for n in (k, v):
        assert tuple(n.meta["val"].shape[1:2]) == (2,)                    # 2 kv heads, before the repeat
        assert [u.target for u in n.users] == [torch.ops.aten.unsqueeze.default]   # repeat_kv reads it


def test_pre_rope_quantizes_the_k_projection_output():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(k_position="pre_rope", values=None)]),
                     progress=False)
    k_proj = {s.node for s in linear_sites(qm.graph_module) if s.path.endswith("k_proj")}
    for n in kv_nodes(qm.graph_module):
        assert n.meta[META_QUANT]["position"] == "pre_rope"
        assert n.args[0].args[0].args[0] in k_proj                       # transpose(view(k_proj(x)))
    gpt2 = qpass.apply(toy.captured("gpt2")[1], Recipe([KvCacheConfig(k_position="pre_rope")]), progress=False)
    assert {n.meta[META_QUANT]["position"] for n in kv_nodes(gpt2.graph_module)} == {"attention_input"}  # no RoPE


def _kv_outputs(qm, *samples):
    nodes = {i: n for i, n in enumerate(kv_nodes(qm.graph_module))}

    class Keep:
        def __init__(self):
            self.x = None

        def update(self, x):
            self.x = x if self.x is None else torch.cat([self.x, x])

    got = observe(qm.graph_module, nodes, lambda k, n: Keep(), CalibrationSet(samples), progress=False)
    return [(nodes[i], got[i].x) for i in nodes]


@pytest.mark.parametrize("gran, per", [(PerToken(), "token"), (PerHead(per_token=True), "token and head")])
def test_int4_quantizer_has_at_most_15_values_per_scale_block(gran, per):
    spec = QSpec(IntFormat(4), gran, dynamic=True)
    qm = qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(keys=spec, values=spec)]), progress=False)
    for node, x in _kv_outputs(qm, toy.token_ids(batch=2, t=6, seed=4)):
        blocks = x.permute(0, 2, 1, 3).reshape(2 * 6, -1) if per == "token" else x.reshape(-1, x.shape[-1])
        assert 4 <= max(len(torch.unique(b)) for b in blocks) <= 15


def test_static_kivi_keys_are_calibrated_per_head_and_channel():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(**KIVI4)]), calib_data=CALIB, progress=False)
    keys = [n for n in kv_nodes(qm.graph_module) if n.meta[META_QUANT]["role"] == "key"]
    assert [str(n.target) for n in keys] == [FQ, FQ]
    scale = qm.graph_module.get_buffer(keys[0].args[1].target)
    assert keys[0].args[1].target == "model_layers_0_self_attn_k_scale" and scale.shape == (1, 2, 1, 8)
    (_, k), = [(n, x) for n, x in _kv_outputs(qm, *CALIB) if n is keys[0]]
    torch.testing.assert_close(k.abs().amax(dim=(0, 2), keepdim=True), scale * 7)   # absmax over calib -> 7
    with pytest.raises(qpass.CalibrationError, match="kv_cache with static"):
        qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(**KIVI4)]))


def test_fp8_and_static_per_head_values():
    cfg = KvCacheConfig(keys=QSpec(FloatFormat("fp8_e4m3"), PerHead(per_token=True), dynamic=True),
                        values=QSpec(IntFormat(8), PerHead()))
    gm = toy.captured("qwen2")[1]
    qm = qpass.apply(gm, Recipe([cfg]), calib_data=CALIB, progress=False)
    v = [n for n in kv_nodes(qm.graph_module) if n.meta[META_QUANT]["role"] == "value"][0]
    assert qm.graph_module.get_buffer(v.args[1].target).shape == (1, 2, 1, 1)
    ids = toy.token_ids(batch=2, t=9, seed=11)
    assert rel(qm(ids).logits.detach(), gm(ids).logits.detach()) < 0.02


def test_eager_attention_matmuls_are_found():
    qm = qpass.apply(toy.captured("llama_eager")[1], Recipe([KvCacheConfig()]), progress=False)
    assert qm.report["kv_cache"].stats["keys_quantized"] == 2
    for n in kv_nodes(qm.graph_module):
        assert n.meta["val"].shape[1] == 2 and n.meta[META_QUANT]["site"].startswith("matmul")


def test_no_attention_is_a_no_op():
    x = toy.mlp_input()
    gm = qpass.capture(toy.TinyMLP(), (x,))
    qm = qpass.apply(gm, Recipe([KvCacheConfig()]))
    assert qm.report["kv_cache"].stats["attention_sites"] == 0 and qm.graph_module.code == gm.code


def test_training_mode_gradients_flow_through_kv_quantizers():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(**KIVI4)]), calib_data=CALIB, progress=False)
    ids = toy.token_ids(batch=2, t=9, seed=11)
    out = qm(ids).logits
    torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
    gm = qm.graph_module
    for name in ("layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight"):
        g = next(p.grad for n, p in gm.named_parameters() if n.endswith(name))
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("options, path, msg", [
    ({"keys": {"granularity": "per_channel"}}, "keys.axis", "axis: -1"),
    ({"keys": None, "values": None}, "keys", "nothing to quantize"),
    ({"k_position": "after_rope"}, "k_position", "did you mean"),
    ({"values": {"granularity": "per_group", "group_size": 4}}, "values.dynamic", "dynamic: true"),
    ({"key": {}}, "key", "did you mean 'keys'"),
])
def test_bad_options_name_their_recipe_path(options, path, msg):
    with pytest.raises(qpass.RecipeError, match=re.escape(f"passes[0].kv_cache.{path}") + ".*" + re.escape(msg)):
        Recipe.from_dict({"passes": [{"kv_cache": options}]})


def test_targets_that_match_nothing():
    with pytest.raises(qpass.TargetNotFoundError, match=r"kv_cache\.targets\[0\].*self_attn"):
        qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(targets=("model.layers.*.attn",))]))
    qm = qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(targets=("model.layers.1.*",))]), progress=False)
    assert qm.report["kv_cache"].stats["keys_quantized"] == 1 and len(qm.report["kv_cache"].near_misses) == 1


def test_decode_graph_quantizes_at_the_cache_write_and_matches_the_full_graph():
    qm = qpass.apply(toy.hf_model("llama"), Recipe([KvCacheConfig(**KIVI4)]), calib_data=CALIB, progress=False)
    step = qm.decode_graph(16)
    writes = [n for n in step.graph.nodes if n.target == torch.ops.aten.index_copy_.default]
    assert len(writes) == 4 and all(str(w.args[3].target) in (FQ, FQD) for w in writes)   # low-bit cache
    assert {n.meta[META_QUANT]["position"] for n in kv_nodes(step)} == {"cache_write"}
    ids = toy.token_ids(batch=1, t=10, seed=5)
    full = qm(ids).logits
    steps = [step(input_ids=ids[:, :6], cache_position=torch.arange(6))]
    steps += [step(input_ids=ids[:, i:i + 1], cache_position=torch.arange(i, i + 1)) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat([getattr(s, "logits", s) for s in steps], 1), full, rtol=1e-4, atol=1e-5)


def test_decode_graph_refuses_dynamic_scales_over_the_sequence():
    cfg = KvCacheConfig(keys=QSpec(IntFormat(4), PerChannel(-1), dynamic=True), values=None)
    qpass.apply(toy.captured("llama")[1], Recipe([cfg]), progress=False)          # fine without a cache
    step = qpass.capture_decode(toy.hf_model("llama"), max_cache_len=16)
    with pytest.raises(qpass.QuantizationError, match="(?s)static cache.*fix: use static"):
        Pipeline([KvCache(cfg)]).run(step, Context())


def test_save_load_round_trip_with_smoothquant_quantize_and_kv_cache(tmp_path):
    recipe = Recipe([SmoothQuantConfig(alpha=0.5, ignore=("lm_head",)),
                     QuantizeConfig(activations=QSpec(IntFormat(8), PerToken(), dynamic=True), ignore=("lm_head",)),
                     KvCacheConfig(**KIVI4)])
    qm = qpass.apply(toy.hf_model("llama"), recipe, calib_data=CALIB, progress=False)
    qm.save(tmp_path / "m")
    back = qpass.load(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=10, seed=9)
    assert torch.equal(back(ids).logits, qm(ids).logits)


def test_a_second_kv_cache_pass_is_refused():
    with pytest.raises(qpass.QuantizationError, match="already quantized by an earlier pass"):
        qpass.apply(toy.captured("llama")[1], Recipe([KvCacheConfig(), KvCacheConfig()]))


# --------------------------------------------------------- asymmetric K/V in groups (QuaRot's KV quantizer)
# QuaRot quantizes K and V asymmetrically (a zero point), per token and head in groups of 128 channels, each group's
# min and max times 0.95. The toy heads are 8 wide: group_size 4 splits each head in two, 128 is one group per head.

def asym_kv(group_size: int, clip: float = 0.95) -> dict:
    spec = {"bits": 4, "granularity": "per_group", "group_size": group_size, "symmetric": False, "dynamic": True,
            "clip_ratio": clip}
    return {"keys": spec, "values": dict(spec)}


def asym_reference(x: torch.Tensor, g: int, c: float, bits: int = 4) -> torch.Tensor:
    """QuaRot's asymmetric ActQuantizer per group of g along the last axis, written out in float64."""
    xg = x.double().reshape(*x.shape[:-1], -1, g)
    lo = torch.minimum(xg.amin(-1, keepdim=True), torch.zeros(())) * c
    hi = torch.maximum(xg.amax(-1, keepdim=True), torch.zeros(())) * c
    qmax = 2**bits - 1
    s = (hi - lo) / qmax
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(xg / s) + z, 0, qmax) - z) * s).reshape(x.shape)


@pytest.mark.parametrize("group, block, g", [(4, [1, 1, 1, 4], 4), (128, [1, 1, 1, -1], 8)])
def test_asymmetric_groups_are_quarots_kv_quantizer(group, block, g):
    qm = qpass.apply(toy.captured("llama")[1], Recipe.from_dict({"passes": [{"kv_cache": asym_kv(group)}]}),
                     progress=False)
    nodes = kv_nodes(qm.graph_module)
    assert len(nodes) == 4 and all(str(n.target) == FQD for n in nodes)
    assert all(list(n.args[1]) == block and n.args[3] is False and n.args[4] == 0.95 for n in nodes)
    ids = toy.token_ids(batch=2, t=6, seed=4)
    keep = {("in", i): n.args[0] for i, n in enumerate(nodes)} | {("out", i): n for i, n in enumerate(nodes)}

    class Last:
        def update(self, x):
            self.x = x

    got = observe(qm.graph_module, keep, lambda k, n: Last(), CalibrationSet([ids]), progress=False)
    for i in range(len(nodes)):
        x, y = got[("in", i)].x, got[("out", i)].x
        ref = asym_reference(x, g, 0.95).float()
        step = (x.abs().amax(-1, keepdim=True) / 7).expand_as(x)
        assert bool(((y - ref).abs() <= 1e-5 * step + 1e-6).float().mean() > 0.99)     # up to fp32 vs fp64 ties
        assert bool(((y - ref).abs() <= step * 1.001).all())
        assert max(len(torch.unique(b)) for b in y.reshape(-1, g)) <= 16              # 16 codes with a zero point


def test_groups_that_straddle_heads_are_refused_with_the_attention_and_a_fix():
    with pytest.raises(qpass.QuantizationError,
                       match=r"(?s)keys of model\.layers\.0\.self_attn have head_dim 8.*group_size 3.*fix:.*4 or 2"):
        qpass.apply(toy.captured("llama")[1], Recipe.from_dict({"passes": [{"kv_cache": asym_kv(3)}]}),
                    progress=False)


def _w4a4_asym_kv(group: int):
    """W4A4 and asymmetric KV4: groups of `group` along head_dim, or (0) one zero point per token across heads."""
    kv = asym_kv(group)
    if not group:
        kv = {role: {k: v for k, v in spec.items() if k != "group_size"} | {"granularity": "per_token"}
              for role, spec in kv.items()}
    rec = {"passes": [{"quantize": {"weights": {"bits": 4, "granularity": "per_channel"},
                                    "activations": {"bits": 4, "granularity": "per_token", "dynamic": True,
                                                    "clip_ratio": 0.9}, "ignore": ["lm_head"]}},
                      {"kv_cache": kv}]}
    return qpass.apply(toy.hf_model("llama"), rec, progress=False)


@pytest.mark.parametrize("group", [4, 128, 0])
def test_torch_backend_stores_asymmetric_kv_with_zero_points_and_parity(group):
    from qpass.backends.torch_packed import PackedKVCache

    qm = _w4a4_asym_kv(group)
    pm = qpass.lower(qm, "torch", kernels="exact")
    ids = toy.token_ids(batch=1, t=10, seed=5)
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    dg, fq = pm.decode_graph(16), qm.decode_graph(16)
    caches = [m for m in dg.modules() if isinstance(m, PackedKVCache)]
    zero_shape = {4: (1, 2, 16, 2), 128: (1, 2, 16, 1), 0: (1, 1, 16, 1)}[group]    # head_dim 8, 2 K/V heads
    assert len(caches) == 4 and all(c.zero is not None and c.zero.dtype == torch.uint8 and not c.symmetric
                                    and tuple(c.zero.shape) == zero_shape and c.clip_ratio == 0.95 for c in caches)
    for t, pos in [(ids[:, :6], torch.arange(6)), (ids[:, 6:7], torch.tensor([6])), (ids[:, 7:8], torch.tensor([7]))]:
        a, b = dg(input_ids=t, cache_position=pos), fq(input_ids=t, cache_position=pos)
        torch.testing.assert_close(getattr(a, "logits", a), getattr(b, "logits", b), rtol=1e-5, atol=1e-5)
    assert int(caches[0].zero[:, :, :8].min()) >= 0 and int(caches[0].zero[:, :, :8].max()) <= 15
    assert int(caches[0].zero[:, :, :8].max()) > 0                    # a zero point used, not a symmetric grid
    prompt = toy.token_ids(1, 5)
    assert torch.equal(pm.generate(prompt, max_new_tokens=4), qm.generate(prompt, max_new_tokens=4))


@pytest.mark.parametrize("group", [4, 128, 0])
def test_onnx_lowers_asymmetric_kv_with_zero_points_and_parity(group, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from qpass.backends import onnx_qdq
    from qpass.backends.onnx_qdq.runtime import DecoderRunner

    qm = _w4a4_asym_kv(group)
    qpass.lower(qm, "onnx", tmp_path / "m")
    sess = onnx_qdq.session(str(tmp_path / "m"))
    ids = toy.token_ids(batch=1, t=10, seed=5)
    ref = qm(ids).logits.float()
    torch.testing.assert_close(onnx_qdq.logits(sess, ids).float(), ref, rtol=0, atol=5e-3)
    run = DecoderRunner(sess)                            # prefill, then one token at a time through the past cache
    run.reset(1)
    steps = [run(ids[:, :6], torch.arange(6))] + [run(ids[:, i:i + 1], torch.tensor([i])) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), ref, rtol=0, atol=5e-3)
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    block = {4: 4, 128: 8, 0: 16}[group]                # per token across heads: the 2 heads' 8 channels flattened
    kv_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3
             and any(a.name == "block_size" and a.i == block for a in n.attribute)]
    assert len(kv_dq) >= 4                               # K and V of both layers dequantized with zero points
