"""The rotate pass (QuaRot residual-stream rotation) and the Hadamard primitives: the rotated float model equals
the original on every family the folding analysis supports, tied embeddings included; plans reload exactly; what
cannot be rotated is refused with the reason."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpass
from qpass import Recipe
from qpass.errors import QpassError
from qpass.graph import linear_sites, param_of
from qpass.passes.rotate import RotateConfig, rotation_matrix
from qpass.primitives import hadamard as H
from qpass.rotation import residual_stream_rotation
from tests import toy

ALL = ("llama", "mistral", "qwen2", "opt", "gpt2", "llama_tied", "phi3", "gpt_neox")
W8 = {"bits": 8, "granularity": "per_channel", "symmetric": True}


def _fresh(family):
    """A copy of the captured toy model with non-trivial norm weights and biases (HF initialises 1 and 0)."""
    gm = qpass.apply(toy.captured(family)[1], Recipe([])).graph_module
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ids = toy.token_ids()
    return gm, ids, gm(ids).logits


# ------------------------------------------------------------------------------------------ primitives


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 4, 8, 12, 20, 24, 44, 48, 96, 192, 30, 40, 704]), st.integers(0, 2 ** 31))
def test_hadamard_transform_is_the_dense_orthogonal_matrix(n, seed):
    factor, kind = H.small_factor(n, seed)
    t = H.transform_matrix(n, factor)
    assert torch.allclose(t @ t.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(seed % 1000), dtype=torch.float64)
    torch.testing.assert_close(H.hadamard_transform(x, factor), x @ t)
    q, _ = H.randomized_hadamard(n, seed)
    m = H.mean_preserving(q)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    torch.testing.assert_close(m @ torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))


def test_hadamard_sizes_split_into_known_matrices():
    assert H.split(256)[:2] == (1, 256)
    assert H.split(704)[:2] == (44, 16)          # tiny-llama's MLP: Paley 44 x Sylvester 16
    assert H.split(192)[:2] == (12, 16)          # tiny-opt's width
    assert H.small_factor(30)[1] == "random"     # 15 x 2: no Hadamard of order 15
    h = H.paley(12)
    torch.testing.assert_close(h @ h.T, 12 * torch.eye(12, dtype=torch.float64))
    assert H.paley(16) is None
    with pytest.raises(ValueError, match="power-of-two"):
        H.fwht(torch.zeros(3))


def test_rotation_matrix_is_seeded():
    a, kind = rotation_matrix(32, "hadamard", 3)
    assert kind == "hadamard" and torch.equal(a, rotation_matrix(32, "hadamard", 3)[0])
    assert not torch.equal(a, rotation_matrix(32, "hadamard", 4)[0])
    assert (a.abs() - 1 / math.sqrt(32)).abs().max() < 1e-12        # a (signed) Hadamard: flat entries
    r, kind = rotation_matrix(32, "random", 3)
    assert kind == "random" and torch.allclose(r @ r.T, torch.eye(32, dtype=torch.float64), atol=1e-10)


# ------------------------------------------------------------------------------------------ the pass


@pytest.mark.parametrize("family", ALL)
def test_rotate_keeps_outputs(family):
    gm, ids, ref = _fresh(family)
    emb = param_of(gm, next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default).args[0])
    emb0 = emb.detach().clone()
    res = qpass.apply(gm, Recipe([RotateConfig(seed=1)]))
    torch.testing.assert_close(res(ids).logits, ref, rtol=1e-4, atol=1e-4)
    stats = res.report["rotate"].stats
    layer_norm = family in ("opt", "gpt2", "gpt_neox")
    assert stats["layer_norms"] == (5 if layer_norm else 0)
    assert stats["untied"] == (family in ("opt", "gpt2", "llama_tied"))
    assert stats["writers"] == 4 and stats["readers"] >= 5
    plan = res.plans[0].decisions
    assert plan["mean_preserving"] == layer_norm and plan["kind"] == "hadamard" and plan["seed"] == 1
    out = res.graph_module
    table = param_of(out, next(n for n in out.graph.nodes if n.target is torch.ops.aten.embedding.default).args[0])
    q, _ = rotation_matrix(32, "hadamard", 1, mean_preserving=layer_norm)
    torch.testing.assert_close(table.detach().double(), emb0.double() @ q, rtol=1e-5, atol=1e-6)
    stream = residual_stream_rotation(out)
    for n in stream.norm_weights:                     # every norm on the stream is now the identity
        for a in n.args:
            if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                v = param_of(out, a)
                assert bool((v == 1).all() or (v == 0).all()), (family, n.name)


def test_tied_embeddings_are_untied_and_both_rotated():
    gm, ids, ref = _fresh("llama_tied")
    res = qpass.apply(gm, Recipe([RotateConfig(seed=2)]))
    out = res.graph_module
    head = linear_sites(out)[-1]
    emb = next(n for n in out.graph.nodes if n.target is torch.ops.aten.embedding.default).args[0]
    assert head.weight.target.endswith("weight_untied") and head.weight.target != emb.target
    assert res.plans[0].decisions["edits"] == [["untie", "lm_head", 0]]
    assert not torch.equal(param_of(out, head.weight), param_of(out, emb))   # lm_head holds g * E Q, the table E Q
    torch.testing.assert_close(res(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama_tied", "opt"])
def test_plan_on_a_fresh_capture_rebuilds_the_graph(family):
    gm, ids, ref = _fresh(family)
    res = qpass.apply(gm, Recipe([RotateConfig(seed=5)]))
    fresh = qpass.apply(toy.captured(family)[1], Recipe([])).graph_module
    qpass.plan.apply_plans(fresh, res.plans)
    fresh.load_state_dict(res.graph_module.state_dict())
    torch.testing.assert_close(fresh(ids).logits, res(ids).logits, rtol=0, atol=0)
    assert [n.format_node() for n in fresh.graph.nodes] == [n.format_node() for n in res.graph_module.graph.nodes]


def test_rotate_then_quantize_beats_plain_w4a4_on_a_toy():
    """The point of rotating: per-token A4 / per-channel W4 error drops once outliers are spread."""
    gm, ids, ref = _fresh("llama")
    with torch.no_grad():                             # an outlier channel in the residual stream, as trained LMs have
        next(p for n, p in gm.named_parameters() if "embed_tokens" in n)[:, 3] *= 30
    ref = gm(ids).logits
    q = {"quantize": {"weights": {"bits": 4, "granularity": "per_channel", "symmetric": True},
                      "activations": {"bits": 4, "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}
    plain = qpass.apply(gm, {"passes": [q]})(ids).logits
    rotated = qpass.apply(gm, {"passes": [{"rotate": {"seed": 0}}, q]})(ids).logits
    assert (rotated - ref).pow(2).mean() < (plain - ref).pow(2).mean()


# ------------------------------------------------------------------------------------------ refusals


class _ReturnsHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.emb(ids)
        return h + self.fc(h)


class _Gelu(_ReturnsHidden):
    def forward(self, ids):
        h = self.emb(ids)
        return self.fc(torch.nn.functional.gelu(h + self.fc(h)))


def test_unrotatable_streams_say_why():
    ids = torch.randint(0, 10, (2, 5))
    assert "graph output" in residual_stream_rotation(qpass.capture(_ReturnsHidden(), (ids,)))
    why = residual_stream_rotation(qpass.capture(_Gelu(), (ids,)))
    assert "gelu" in why and "does not commute" in why
    with pytest.raises(QpassError, match="rotate cannot rotate the residual stream.*gelu"):
        qpass.apply(qpass.capture(_Gelu(), (ids,)), {"passes": [{"rotate": {}}]}, progress=False)
    assert "no input embedding" in residual_stream_rotation(qpass.capture(toy.TinyMLP(), (toy.mlp_input(),)))


def test_rotate_after_quantize_is_refused_and_options_are_checked():
    gm, _, _ = _fresh("llama")
    q = {"quantize": {"weights": W8, "ignore": ["lm_head"]}}
    with pytest.raises(QpassError, match="(?s)already quantized.*before quantize"):
        qpass.apply(gm, {"passes": [q, {"rotate": {}}]}, progress=False)
    with pytest.raises(qpass.RecipeError, match="kind"):
        Recipe.from_dict({"passes": [{"rotate": {"kind": "hadamrd"}}]})


# ------------------------------------------------------------------------------------------ online Hadamards

ONLINE = RotateConfig(seed=1, online=True, heads=True)
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}
KV8 = {"keys": {"bits": 8, "granularity": "per_head", "dynamic": True},
       "values": {"bits": 8, "granularity": "per_head", "dynamic": True}}


def _hadamards(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is H.HADAMARD]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3", "gpt_neox", "llama_eager"])
def test_online_hadamards_keep_outputs(family):
    gm, ids, ref = _fresh(family)
    res = qpass.apply(gm, Recipe([ONLINE]))
    torch.testing.assert_close(res(ids).logits, ref, rtol=1e-4, atol=1e-4)
    stats = res.report["rotate"].stats
    assert stats["online_hadamards"] == len(_hadamards(res.graph_module)) == 4 + 2 * 2   # 4 writers, q and k x 2
    assert stats["values_rotated"] == 2 and not res.report["rotate"].near_misses
    plan = res.plans[0].decisions
    assert len(plan["online"]) == 4 and len(plan["heads"]) == 2


def test_keys_are_quantized_after_their_hadamard_and_plans_reload(tmp_path):
    rec = {"passes": [{"rotate": {"seed": 1, "online": True, "heads": True}},
                      {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}}, {"kv_cache": KV8}]}
    qm = qpass.apply(toy.hf_model("llama"), rec, progress=False)
    kv = [n for n in qm.graph_module.graph.nodes if n.meta.get("qpass_origin") == "kv_cache" and n.op == "call_function"
          and "quantize" in str(n.target)]
    assert sorted(str(n.args[0].target) for n in kv).count("qpass.hadamard.default") == 2     # K of both layers
    down = next(s for s in linear_sites(qm.graph_module) if s.path.endswith("0.mlp.down_proj"))
    assert down.input.args[0].target is H.HADAMARD                  # activation quantizer reads the rotated input
    qm.save(tmp_path / "m")
    loaded = qpass.load(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=9, seed=2)
    assert torch.equal(loaded(ids).logits, qm(ids).logits)
    dec = loaded.decode_graph(max_cache_len=32)                     # the cache write gets the rotated K too
    writes = [n for n in dec.graph.nodes if n.op == "call_function" and "index_copy" in str(n.target)]
    assert writes and any(w.args[3].target is H.HADAMARD or (w.args[3].args and getattr(w.args[3].args[0], "target",
                                                                                       None) is H.HADAMARD)
                          for w in writes)


def test_torch_backend_runs_the_fast_transform_with_parity(monkeypatch):
    rec = {"passes": [{"rotate": {"seed": 1, "online": True, "heads": True}},
                      {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}}, {"kv_cache": KV8}]}
    qm = qpass.apply(toy.hf_model("llama"), rec, progress=False)
    pm = qpass.lower(qm, "torch", kernels="exact")
    ids = toy.token_ids(batch=2, t=12, seed=5)
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = toy.token_ids(1, 5)
    assert torch.equal(pm.generate(prompt, max_new_tokens=4), qm.generate(prompt, max_new_tokens=4))
    targets = {n.target for n in pm.graph_module.graph.nodes if n.op == "call_function"}
    assert H.hadamard_transform in targets and H.HADAMARD not in targets    # called directly, no op dispatch
    x = torch.randn(3, 256)                           # a power of two: radix-16 butterflies, never a [256, 256] matrix
    expect = x.double() @ (H.sylvester(256) / 16)
    matmul = torch.matmul

    def small_only(a, b):
        assert max(a.shape[-1], b.shape[-1]) <= 16, (a.shape, b.shape)
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", small_only)
    torch.testing.assert_close(H.hadamard_transform(x, torch.ones(1, 1)).double(), expect, rtol=1e-5, atol=1e-5)


def test_onnx_lowers_online_hadamards_to_matmul_with_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from qpass.backends import onnx_qdq

    rec = {"passes": [{"rotate": {"seed": 1, "online": True, "heads": True}},
                      {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}}, {"kv_cache": KV8}]}
    qm = qpass.apply(toy.hf_model("llama"), rec, progress=False)
    qpass.lower(qm, "onnx", tmp_path / "m")
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=5e-3)
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.domain not in ("", "com.microsoft")]   # standard ops only


def test_rotate_stats_tool_writes_its_section(tmp_path):
    from tools import rotate_stats

    src = toy.save_hf_dir(tmp_path / "src", "llama")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    doc = tmp_path / "doc.md"
    doc.write_text(f"# keep\n\n{rotate_stats.BEGIN}\nold\n{rotate_stats.END}\n\ntail\n")
    assert rotate_stats.main([src, "--calib", str(text), "--window", "32", "--samples", "2", "--doc", str(doc)]) == 0
    out = doc.read_text()
    assert out.startswith("# keep") and out.rstrip().endswith("tail") and "old" not in out
    assert "lm_head" in out and "kurtosis after" in out and "mean over linears" in out


def test_signed_online_hadamard_spreads_a_common_mode():
    """ReLU outputs are all positive: Hadamard's all-ones first column piles their mean onto channel 0; random
    signs first (what the rotate pass's writer Hadamards carry) spread it."""
    x = torch.relu(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)))
    factor, s = torch.ones(1, 1), H.random_signs(256, 3).float()
    ratio = lambda y: float(y.abs().amax(0).max() / y.abs().amax(0).median())       # noqa: E731
    assert ratio(torch.ops.qpass.hadamard(x, factor)) > 5 > 2 > ratio(torch.ops.qpass.hadamard(x, factor, s))
    dense = s.double().view(256, 1) * H.transform_matrix(256, factor.double())
    torch.testing.assert_close(torch.ops.qpass.hadamard(x, factor, s).double(), x.double() @ dense, rtol=1e-5,
                               atol=1e-5)
    xg = x.clone().requires_grad_(True)
    torch.ops.qpass.hadamard(xg, factor, s).sum().backward()
    torch.testing.assert_close(xg.grad.double(), torch.ones(64, 256, dtype=torch.float64) @ dense.T, rtol=1e-5,
                               atol=1e-5)
