"""Decode runtime passes (backends/torch_packed/runtime.py): each fires where it should, leaves other graphs
alone, and keeps the step's function: bit for bit for RoPE and the calling convention; within float
summation order (rtol/atol 1e-5) for prefix attention (the attention kernel sums a shorter row) and RMSNorm
(its mean is summed natively)."""
from __future__ import annotations

import pytest
import torch

import qpass
from qpass.backends import torch_packed as tp
from qpass.backends.torch_packed import native, runtime
from tests import toy

aten = torch.ops.aten
W4 = {"bits": 4, "granularity": "per_group", "group_size": 16}
KV4 = {"bits": 4, "granularity": "per_token", "dynamic": True}
KV8_STATIC = {"bits": 8, "granularity": "per_channel", "axis": -1}


def recipe(kv=None, activations=None):
    passes = [{"quantize": {"weights": W4, "activations": activations, "ignore": ["lm_head"]}}]
    return {"passes": passes + ([{"kv_cache": {"keys": kv, "values": kv}}] if kv else [])}


def lowered(family="llama", kv=None, activations=None, calib=False):
    model = toy.hf_model(family)
    kw = {"calib_data": [toy.token_ids(1, 12, seed=s) for s in range(2)]} if calib else {}
    qm = qpass.apply(model, recipe(kv, activations), progress=False, **kw)
    pm = qpass.lower(qm, "torch", kernels="exact")
    return pm, qpass.capture_decode(model, max_cache_len=64)


def steps(batch=1):
    ids = toy.token_ids(batch, 9)
    return [(ids[:, :6], torch.arange(6))] + [(ids[:, i:i + 1], torch.tensor([i])) for i in range(6, 9)]


def run(gm, batch=1):
    with torch.no_grad():
        return [gm(input_ids=ids, cache_position=pos) for ids, pos in steps(batch)]


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.mark.parametrize("kv", [None, KV4, KV8_STATIC], ids=["float_cache", "kv4_dynamic", "kv8_static"])
def test_prefix_attention_cuts_the_cache_and_keeps_the_logits(kv):
    pm, template = lowered(kv=kv, calib=kv is KV8_STATIC)
    ref = pm.decode_graph(64, template=template, optimize=False)
    pm._decoders.clear()                            # a second, unoptimized decode graph to rewrite
    gm = pm.decode_graph(64, template=template, optimize=False)
    assert runtime.prefix_attention(gm) == 2                    # one per layer
    cut = [n for n in gm.graph.nodes if n.target is runtime.n_keys]
    assert len(cut) == 1 and count(gm, runtime.additive_mask) == 1
    for n in gm.graph.nodes:
        if n.target is aten.scaled_dot_product_attention.default:
            k, v, mask = n.args[1:4]
            assert mask.target is runtime.additive_mask                # made once, shared by both layers
            mask = mask.args[0]
            assert mask.target is aten.slice.Tensor and mask.args[3] is cut[0]
            for t in (k, v):
                assert (t.args[3] if t.target is aten.slice.Tensor else t.args[2]) is cut[0]
    pm._decoders.clear()
    for a, b in zip(run(gm), run(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_packed_cache_dequantizes_only_the_prefix():
    cache = tp.PackedKVCache((1, 2, 16, 8), "int4", [1, 1, 1, -1], True)
    k = torch.randn(1, 2, 5, 8)
    full = cache(k, torch.arange(5))
    part = cache.dequantize(5)
    assert part.shape == (1, 2, 5, 8) and torch.equal(part, full[:, :, :5])
    assert torch.equal(cache.dequantize(64), full)              # past the end: the whole cache


def test_prefix_attention_leaves_graphs_without_a_static_cache_alone():
    pm, _ = lowered()
    before = len(pm.graph_module.graph.nodes)
    assert runtime.prefix_attention(pm.graph_module) == 0
    assert len(pm.graph_module.graph.nodes) == before


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2/FMA or no C compiler)")
def test_rms_norm_and_rope_fuse_on_llama_and_keep_the_step():
    pm, template = lowered(kv=KV4)
    ref = pm.decode_graph(64, template=template, optimize=False)
    pm._decoders.clear()
    gm = pm.decode_graph(64, template=template, optimize=False)
    assert runtime.fuse_rms_norm(gm) == 5                      # 2 per layer + the final norm
    assert runtime.fuse_rope(gm) == 4                          # q and k per layer
    assert count(gm, runtime.rms_norm) == 5 and count(gm, runtime.rope) == 4
    # What the fusions replace is gone: the RMSNorm chain and rotate_half (neg + cat of the two halves). Other
    # cats may remain (transformers >= 5.25 computes cat(freqs, freqs) for the rotary table in the step).
    for op in (aten.rsqrt.default, aten.mean.dim, aten.pow.Tensor_Scalar, aten.neg.default):
        assert count(gm, op) == 0, op
    assert not [n for n in gm.graph.nodes if n.target is aten.cat.default
                and any(getattr(a, "target", None) in (aten.neg.default, aten.slice.Tensor) for a in n.args[0])]
    pm._decoders.clear()
    for a, b in zip(run(gm), run(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2/FMA or no C compiler)")
def test_fusions_find_nothing_on_gpt2():
    pm, template = lowered("gpt2")
    gm = pm.decode_graph(64, template=template, optimize=False)
    assert runtime.fuse_rms_norm(gm) == 0 and runtime.fuse_rope(gm) == 0     # LayerNorm, learned positions


def test_a_mismatched_pattern_is_not_fused():
    """An RMSNorm whose normalised value is also used elsewhere must keep its aten ops."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    p = g.call_function(aten.pow.Tensor_Scalar, (x, 2))
    m = g.call_function(aten.mean.dim, (p, [-1], True))
    a = g.call_function(aten.add.Tensor, (m, 1e-5))
    r = g.call_function(aten.rsqrt.default, (a,))
    inner = g.call_function(aten.mul.Tensor, (x, r))
    out = g.call_function(aten.mul.Tensor, (w, inner))
    g.output((out, inner))                                     # `inner` escapes
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.ones(8))
    gm = torch.fx.GraphModule(root, g)
    for n in gm.graph.nodes:
        n.meta["val"] = torch.empty(1, 8)
    assert runtime.fuse_rms_norm(gm) == 0


def test_freeze_calls_packed_modules_directly_and_keeps_the_calling_convention():
    pm, template = lowered(kv=KV4)
    ref = pm.decode_graph(64, template=template, optimize=False)
    pm._decoders.clear()
    gm = pm.decode_graph(64, template=template, optimize=False)
    stats = runtime.freeze(gm)
    assert stats["guards"] == 1 and stats["direct_calls"] == 14 + 4 and stats.get("plain_call") == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert all("." not in n.target for n in gm.graph.nodes if n.op == "get_attr")
    assert any(isinstance(m, tp.PackedLinear) for m in gm.modules())     # the module tree is still there
    pm._decoders.clear()
    for a, b in zip(run(gm), run(ref)):
        assert torch.equal(a, b)
    ids, pos = steps()[0]
    assert gm(ids, pos).shape == (1, 6, 96)                    # positional arguments work too


FIRES = {  # family: (rms_norm, rope) sites; every family: attention cut in both layers, direct calls only
    "llama": (5, 4), "mistral": (5, 4), "qwen2": (5, 4), "phi3": (5, 4),
    "gpt2": (0, 0),             # LayerNorm, learned positions
    "opt": (0, 0),              # LayerNorm, learned positions from explicit position_ids (capture retries)
    "gpt_neox": (0, 4),         # LayerNorm; RoPE on the first quarter of head_dim (partial rotary)
}


@pytest.mark.parametrize("family", list(FIRES))
def test_optimized_decode_generates_the_same_tokens(family):
    from qpass.generate import generate

    pm, _ = lowered(family, kv=KV4 if family != "gpt2" else None)
    prompt = toy.token_ids(2, 5)
    fast = pm.generate(prompt, 12, max_cache_len=64)          # batch 2, optimized
    gm = pm.decode_graph(64, 2)
    stats = gm.meta[runtime.META_RUNTIME]
    assert stats["prefix_attention"] == 2 and stats["plain_call"] == 1
    if native.available():
        assert (stats["rms_norm"], stats["rope"]) == FIRES[family]
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    slow_graph = pm.decode_graph(64, 2, optimize=False)
    slow = generate(lambda ids, pos: slow_graph(input_ids=ids, cache_position=pos), prompt, 12)
    assert torch.equal(fast, slow)


def test_moving_the_model_rebuilds_decode_graphs():
    pm, template = lowered()
    pm.decode_graph(64, template=template)
    assert pm._decoders
    pm.float()
    assert not pm._decoders


def test_generate_reuses_a_decode_graph_that_is_long_enough():
    pm, _ = lowered()
    short, long_ = toy.token_ids(1, 5), toy.token_ids(1, 70, seed=4)
    a = pm.generate(short, 8)                                   # cache 64
    b = pm.generate(long_, 8)                                   # needs 78: cache 128
    assert sorted(n for _, n, _ in pm._decoders) == [64, 128]
    c = pm.generate(toy.token_ids(1, 60, seed=5), 10)          # needs 70: the 128 graph, no new capture
    assert sorted(n for _, n, _ in pm._decoders) == [64, 128]
    assert torch.equal(a, pm.generate(short, 8))                # the smallest graph that fits: 64
    assert torch.equal(a, pm.generate(short, 8, max_cache_len=128))  # a longer cache: the same tokens
    assert c.shape == (1, 70) and b.shape == (1, 78)


def test_a_bf16_model_decodes_in_bf16_with_its_own_weights():
    """The decode graph is built in the model's dtype and shares its tensors (it once kept the fresh fp32
    weights of the rebuilt architecture for everything the recipe left in float); fusions that need fp32
    stand aside."""
    from qpass.generate import generate

    for model in (toy.hf_model("llama").to(torch.bfloat16),                 # cast: rotary buffer bf16 too
                  _from_config_bf16()):                                       # built in bf16: rotary fp32
        qm = qpass.apply(model, recipe(KV4), progress=False)
        pm = qpass.lower(qm, "torch", kernels="exact")
        ids = toy.token_ids(1, 6)
        for gm, ref in ((pm.decode_graph(64), pm(ids).logits), (qm.decode_graph(64), qm(ids).logits)):
            assert {p.dtype for p in gm.parameters()} == {torch.bfloat16}
            out = gm(input_ids=ids, cache_position=torch.arange(6))
            assert out.dtype == torch.bfloat16                      # bf16 rounding, not other weights:
            assert float((out.float() - ref.float()).abs().max()) <= 1e-2 * float(ref.float().abs().max())
        stats = pm.decode_graph(64).meta[runtime.META_RUNTIME]
        assert stats["rms_norm"] == stats["rope"] == 0 and stats["prefix_attention"] == 2
        slow = pm.decode_graph(64, optimize=False)
        assert torch.equal(pm.generate(ids, 8),
                           generate(lambda i, c: slow(input_ids=i, cache_position=c), ids, 8))


def _from_config_bf16():
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(toy.hf_config("llama"), dtype=torch.bfloat16).eval()


def test_a_saved_bf16_model_loads_in_bf16(tmp_path):
    model = _from_config_bf16()
    qm = qpass.apply(model, recipe(), progress=False)
    assert qm.source["dtype"] == "bfloat16"
    pm = qpass.lower(qm, "torch", kernels="exact")
    qm.save(tmp_path / "fq")
    pm.save(tmp_path / "packed")
    ids = toy.token_ids(1, 6)
    for saved, loaded in ((qm, qpass.load(tmp_path / "fq")), (pm, tp.load(tmp_path / "packed"))):
        assert {p.dtype for p in loaded.graph_module.parameters()} == {torch.bfloat16}
        assert torch.equal(loaded(ids).logits, saved(ids).logits)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2/FMA or no C compiler)")
@pytest.mark.parametrize("family,kv", [("llama", None), ("llama", KV4), ("gpt2", None)])
def test_attention_fuses_after_the_prefix_cut_and_keeps_the_step(family, kv):
    pm, template = lowered(family, kv=kv)
    ref = pm.decode_graph(64, template=template, optimize=False)
    pm._decoders.clear()
    gm = pm.decode_graph(64, template=template, optimize=False)
    assert runtime.prefix_attention(gm) == 2
    assert runtime.fuse_attention(gm) == 2 and count(gm, runtime.attention) == 2
    assert count(gm, aten.scaled_dot_product_attention.default) == 0
    for n in gm.graph.nodes:
        if n.target is runtime.attention:
            assert n.args[3].target is runtime.additive_mask and isinstance(n.args[4], float)
    pm._decoders.clear()
    for a, b in zip(run(gm), run(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attention_is_not_fused_with_dropout_a_causal_flag_or_a_boolean_mask():
    def graph(mask_dtype, **kw):
        g = torch.fx.Graph()
        q, k, v, m = (g.placeholder(s) for s in "qkvm")
        g.output(g.call_function(aten.scaled_dot_product_attention.default, (q, k, v, m), kw))
        gm = torch.fx.GraphModule(torch.nn.Module(), g)
        for n, t in zip(gm.graph.nodes, [torch.empty(1, 4, 1, 8)] * 3 + [torch.empty(1, 1, 1, 5, dtype=mask_dtype)]):
            n.meta["val"] = t
        return gm
    assert runtime.fuse_attention(graph(torch.float32, scale=0.5)) == 1
    assert runtime.fuse_attention(graph(torch.bool)) == 0
    assert runtime.fuse_attention(graph(torch.float32, dropout_p=0.1)) == 0
    assert runtime.fuse_attention(graph(torch.float32, is_causal=True)) == 0
