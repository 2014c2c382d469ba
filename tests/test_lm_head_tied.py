"""quantize's tied_embedding option (issue 21): with `shared`, the embedding lookup of a table tied to lm_head
reads lm_head's own weight quantizer (one node, one set of scales), the torch backend gathers rows of the packed
codes (PackedEmbedding) and the ONNX backend gathers rows of lm_head's integer initializer; the float table goes.
`float` (the default) is the behaviour tests/test_lm_head.py checks. Untied models: a no-op with a report line;
a tied lm_head the pass does not quantize: an error."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import qpass
from qpass.graph import is_quantizer, linear_sites
from tests import toy

W4 = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": True}
HEADS = {"int8": {"bits": 8, "granularity": "per_channel", "symmetric": True}, "int4": W4,
         "int4_g128": {**W4, "group_size": 128}}         # one partial group of the toy's 32 columns


def recipe(head: str = "int8", mode: str = "shared") -> dict:
    return {"version": 1, "passes": [{"quantize": {"weights": W4, "ignore": ["lm_head"]}},
                                     {"quantize": {"weights": HEADS[head], "targets": ["lm_head"],
                                                   "tied_embedding": mode}}]}


def _embeddings(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default]


def _head(gm):
    return next(s for s in linear_sites(gm) if s.path.endswith("lm_head"))


def _token_embedding(gm):
    """The lookup that reads the token ids (OPT also has a learned position table)."""
    head = _head(gm)
    return next(e for e in _embeddings(gm) if e.args[0] is head.weight_use or e.args[0] is head.weight)


@pytest.fixture(scope="module", params=["llama_tied", "opt"])
def tied(request):
    return request.param


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_shared_lookup_reads_lm_heads_quantizer(tied, head):
    qm = qpass.apply(toy.hf_model(tied), recipe(head), progress=False)
    gm = qm.graph_module
    site, emb = _head(gm), _token_embedding(gm)
    assert is_quantizer(site.weight_use) and emb.args[0] is site.weight_use      # one node, one set of scales
    path = "model.decoder.embed_tokens" if tied == "opt" else "model.embed_tokens"
    assert qm.plans[-1].decisions["tied_embedding"] == {"lm_head": [path]}
    assert qm.report.rows[-1].stats["tied_embeddings_shared"] == 1
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        fl = qpass.apply(toy.hf_model(tied), recipe(head, "float"), progress=False)
        assert not torch.equal(qm(ids).logits, fl(ids).logits)   # the embeddings changed, so the logits do


def test_shared_embedding_values_equal_fake_quantized_rows():
    model = toy.hf_model("llama_tied")
    qm = qpass.apply(model, recipe("int4"), progress=False)
    gm = qm.graph_module
    from qpass.quantizer import Quantizer
    from qpass.primitives import fake_quantize

    q = Quantizer(_head(gm).weight_use)
    wq = fake_quantize(model.get_input_embeddings().weight.detach(), getattr(gm, q.scale.target), None,
                       list(q.block), q.fmt_name)
    seen = {}
    emb = _token_embedding(gm)
    handle = torch.fx.Interpreter(gm)
    run_node = handle.run_node
    handle.run_node = lambda n: seen.setdefault(n.name, run_node(n)) if n is emb else run_node(n)
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        handle.run(ids)
    assert torch.equal(seen[emb.name], wq[ids])


def test_untied_model_is_a_no_op_with_a_report_line():
    qm = qpass.apply(toy.hf_model("llama"), recipe("int8"), progress=False)
    ref = qpass.apply(toy.hf_model("llama"), recipe("int8", "float"), progress=False)
    assert [n.format_node() for n in qm.graph_module.graph.nodes] == \
        [n.format_node() for n in ref.graph_module.graph.nodes]
    row = qm.report.rows[-1]
    assert row.stats["tied_embeddings_shared"] == 0 and "tied_embedding" not in qm.plans[-1].decisions
    assert any("nothing to share" in m for m in row.near_misses), row.near_misses


def test_tied_lm_head_not_quantized_by_the_pass_is_refused():
    bad = {"passes": [{"quantize": {"weights": W4, "ignore": ["lm_head"], "tied_embedding": "shared"}}]}
    with pytest.raises(qpass.QpassError, match="does not quantize that linear") as e:
        qpass.apply(toy.hf_model("llama_tied"), bad, progress=False)
    assert "lm_head" in str(e.value) and "embed_tokens" in str(e.value)
    with pytest.raises(qpass.RecipeError, match="tied_embedding"):
        qpass.apply(toy.hf_model("llama_tied"), {"passes": [{"quantize": {"weights": None, "activations": {
            "bits": 8, "granularity": "per_token", "dynamic": True}, "tied_embedding": "shared"}}]}, progress=False)
    with pytest.raises(qpass.RecipeError, match="tied_embedding"):
        qpass.Recipe.from_dict({"passes": [{"quantize": {"tied_embedding": "int8"}}]})


def test_save_load_is_exact_and_a_plan_does_not_fit_an_untied_graph(tmp_path):
    from qpass.plan import PlanError, apply_plans

    qm = qpass.apply(toy.hf_model("llama_tied"), recipe("int4"), progress=False)
    qm.save(tmp_path / "m")
    loaded = qpass.load(tmp_path / "m")
    ids = toy.token_ids(2, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qm(ids).logits)
    gm = loaded.graph_module
    assert _token_embedding(gm).args[0] is _head(gm).weight_use
    untied = qpass.capture(toy.hf_model("llama"))
    with pytest.raises(PlanError, match="embedding lookup"):
        apply_plans(untied, qm.plans)


def _greedy(qm, ids, n):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, qm(ids).logits[:, -1:].argmax(-1)], 1)
    return ids


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_torch_packed_gathers_rows_of_the_packed_codes(tied, head, tmp_path):
    from qpass.backends import torch_packed as tp
    from qpass.backends.torch_packed.embedding import PackedEmbedding

    qm = qpass.apply(toy.hf_model(tied), recipe(head), progress=False)
    pm = qpass.lower(qm, "torch", kernels="exact")
    gm = pm.graph_module
    embs = [m for m in gm.modules() if isinstance(m, PackedEmbedding)]
    assert len(embs) == 1 and embs[0].linear is pm.linears()[embs[0].source]
    vocab, hidden = qm.source["hf_config"]["vocab_size"], qm.source["hf_config"]["hidden_size"]
    assert not [n for n, t in gm.named_parameters(remove_duplicate=False) if tuple(t.shape) == (vocab, hidden)]
    assert not [n for n, t in gm.named_buffers() if tuple(t.shape) == (vocab, hidden) and t.is_floating_point()]
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        ref = qm(ids).logits
        torch.testing.assert_close(pm(ids).logits, ref, atol=1e-4, rtol=1e-4)
        pm.save(tmp_path / "p")
        torch.testing.assert_close(tp.load(tmp_path / "p")(ids).logits, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(pm.generate(ids[:1, :4], 5), _greedy(qm, ids[:1, :4], 5))   # the decode graph too
    dg = next(iter(pm._decoders.values()))
    calls = [n for n in dg.graph.nodes if n.op == "call_method" and n.target == "forward"
             and isinstance(getattr(dg, n.args[0].target), PackedEmbedding)]
    assert len(calls) == 1 and dg.meta["qpass_runtime"]["direct_calls"] >= 1     # freeze calls it directly too
    if head == "int8":
        return                   # the float mode's bytes: once per family (int4 below)
    float_pm = qpass.lower(qpass.apply(toy.hf_model(tied), recipe(head, "float"), progress=False), "torch",
                           kernels="exact")

    def stored(g):
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in [*g.parameters(), *g.buffers()]}.values())
    assert stored(gm) + vocab * hidden * 4 == stored(float_pm.graph_module)       # the float table, exactly
    saved = sum(os.path.getsize(tmp_path / "p" / f) for f in os.listdir(tmp_path / "p") if f.endswith(".safetensors"))
    float_pm.save(tmp_path / "f")
    assert saved < sum(os.path.getsize(tmp_path / "f" / f) for f in os.listdir(tmp_path / "f")
                       if f.endswith(".safetensors"))


@pytest.mark.parametrize("n,k", [(96, 32), (101, 80), (160, 64), (77, 50)])
@pytest.mark.parametrize("fmt,block,layout", [("int4", [1, 16], None), ("int4", [1, 16], "dense"),
                                               ("int4", [1, 32], "int4pack"), ("int4", [1, -1], None),
                                               ("int8", [1, -1], None), ("int8", [1, 16], None),
                                               ("int3", [1, 16], None), ("nf4", [1, 16], None),
                                               ("fp8_e4m3", [1, -1], None), ("int4", [-1, -1], None)])
def test_packed_gather_equals_the_fake_quantized_rows(n, k, fmt, block, layout):
    from qpass.backends.torch_packed import packing as P
    from qpass.backends.torch_packed.linear import PackedLinear
    from qpass.primitives import quant as Q

    if layout == "int4pack" and (n % 16 or not P.int4pack_supported()):
        pytest.skip("int4pack takes N % 16 == 0 on a CPU that runs it")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    for symmetric in (True, False) if fmt.startswith("int") else (True,):
        s, z = Q.dynamic_qparams(w, block, fmt, symmetric)
        z = None if z is None else z.round().to(torch.int32)
        ref = Q.fake_quantize(w, s, z, block, fmt)
        mod = PackedLinear.from_weight(w, s, z, block, fmt, layout=layout)
        ids = torch.tensor([[0, n - 1, 5, 5], [n // 2, 3, n - 2, 1]])
        assert torch.equal(mod.gather(ids), ref[ids]), (mod.wf, symmetric)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("tied,head", [("llama_tied", "int4"), ("opt", "int8"), ("opt", "int4_g128"),
                                       pytest.param("llama_tied", "int8", marks=SLOW),
                                       pytest.param("llama_tied", "int4_g128", marks=SLOW),
                                       pytest.param("opt", "int4", marks=SLOW)])
def test_onnx_gathers_rows_of_lm_heads_initializer(tied, head, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from qpass.backends import onnx_qdq

    qm = qpass.apply(toy.hf_model(tied), recipe(head), progress=False)
    art = qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)      # exact: parity to float order
    row = next(r for r in art.report.rows if r.path.endswith("lm_head"))
    assert "tied table shared with" in row.note and "no float table" in row.note, row
    model = onnx.load(art.model_path)
    vocab, hidden = qm.source["hf_config"]["vocab_size"], qm.source["hf_config"]["hidden_size"]
    inits = {i.name: i for i in model.graph.initializer}
    assert not [n for n, i in inits.items() if sorted(i.dims) == sorted([vocab, hidden])
                and i.data_type == onnx.TensorProto.FLOAT]
    gathers = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    head_inputs = {i for n in model.graph.node if n.op_type == "MatMulNBits" for i in n.input
                   if i in inits and vocab in inits[i].dims}
    assert head_inputs and head_inputs <= gathers                        # one initializer, both readers
    assert not [n for n in model.graph.node if n.op_type == "DequantizeLinear" and set(n.input) & head_inputs]
    ids = toy.token_ids(1, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(onnx_qdq.logits(onnx_qdq.session(art.path), ids), qm(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_onnx_shared_table_is_smaller_and_unsupported_heads_are_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import copy
    import sys

    from qpass.backends.onnx_qdq import patterns

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    from lm_head_bytes import onnx_stored_bytes

    sizes = {}
    for mode in ("float", "shared"):
        qm = qpass.apply(toy.hf_model("opt"), recipe("int8", mode), progress=False)
        sizes[mode] = onnx_stored_bytes(qpass.lower(qm, "onnx", tmp_path / mode).model_path)
    vocab, hidden = qm.source["hf_config"]["vocab_size"], qm.source["hf_config"]["hidden_size"]
    table = vocab * hidden * 4                          # the float table goes (a few bytes of Gather constants come)
    assert sizes["float"] - table < sizes["shared"] <= sizes["float"] - table + 64, sizes
    asym = recipe("int4")
    asym["passes"][1]["quantize"]["weights"] = {**W4, "symmetric": False}
    qm = qpass.apply(toy.hf_model("llama_tied"), asym, progress=False)
    with pytest.raises(qpass.UnsupportedOpError, match="tied embedding table"):
        patterns.rewrite(copy.deepcopy(qm.graph_module))          # what lower() runs on its capture


def test_streaming_from_disk_equals_in_memory(tmp_path):
    src = toy.save_hf_dir(tmp_path / "src", "llama_tied")
    res = qpass.apply_from_disk(src, recipe("int8"), tmp_path / "out", progress=False)
    mem = qpass.apply(toy.hf_model("llama_tied"), recipe("int8"), progress=False)
    ids = toy.token_ids(1, 6, seed=2)
    with torch.no_grad():
        assert torch.equal(qpass.load(res.directory)(ids).logits, mem(ids).logits)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 70), group=st.sampled_from([-1, 16, 32]), data=st.data())
def test_row_codes_of_any_layout_are_the_rows_of_the_codes(n, k, group, data):
    """PackedLinear.row_codes(rows) == codes()[rows] for rows in any order with repeats (odd N and K, partial
    groups, the q4 layout's partial last block of rows)."""
    from qpass.backends.torch_packed.linear import PackedLinear
    from qpass.primitives import quant as Q

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 71 + k))
    block = [1, group]
    s, _ = Q.dynamic_qparams(w, block, "int4", True)
    rows = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=9)))
    for layout in ("q4", "dense", "bitplanes"):
        mod = PackedLinear.from_weight(w, s, None, block, "int4", layout=layout)
        assert torch.equal(mod.row_codes(rows), mod.codes()[rows]), layout
