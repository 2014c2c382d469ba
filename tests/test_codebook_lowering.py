"""Learned codebooks (formats.Codebook, per channel and per group, with and without sparse values) lowered to the
torch backend (CodebookLinear: packed b-bit codes + tables) and to ONNX (Gather from the tables + MatMul)."""
import pytest
import torch

import qpass
from qpass import Recipe
from qpass.graph import linear_sites, param_of
from qpass.primitives import formats as F
from qpass.primitives.spec import PerChannel, PerGroup, QSpec
from qpass.quantizer import QuantMeta, Quantizer, SideChannels, SparseValues, insert_quantizer, quantizers
from tests import toy


def codebook_quantize(qm, bits: int, group: int | None, n_outliers: int = 0, seed: int = 0):
    """Every linear's weight quantized by a codebook<bits> quantizer (per channel, or per group of `group` input
    columns), fp16 tables from the block's quantiles (jittered), fp16 scales, and the `n_outliers` largest errors
    as fp16 sparse values; in the orientation the graph consumes the weight (GPT-2's [in, out] included)."""
    gm = qm.graph_module
    g = torch.Generator().manual_seed(seed)
    fmt = F.get_format(f"codebook{bits}")
    for site in linear_sites(gm):
        w = param_of(gm, site.weight).detach()
        w_use = w if site.in_axis == site.use_in_axis else w.t()       # as the quantizer sees it
        in_axis = site.use_in_axis
        canon = w_use if in_axis == 1 else w_use.t()
        n, k = canon.shape
        bk = -1 if group is None else group
        blocks = torch.split(canon, k if group is None else group, dim=1)
        scale = torch.stack([b.abs().amax(1) for b in blocks], 1).clamp(min=1e-6).half().float()   # [N, Sk]
        q = torch.linspace(0, 1, 2 ** bits)
        table = torch.stack([torch.quantile(b / scale[:, i:i + 1], q, dim=1).t() for i, b in enumerate(blocks)], 1)
        table = (table + 1e-3 * torch.randn(table.shape, generator=g)).half().float()             # [N, Sk, T]
        block = [1, bk]
        if in_axis == 0:
            scale, table, block = scale.t().contiguous(), table.transpose(0, 1).contiguous(), block[::-1]
        spec = QSpec(fmt, PerChannel(0) if group is None else PerGroup(group))
        side = SideChannels()
        if n_outliers:
            base = F.fake_quantize_ext(w_use, scale, None, block, fmt.name, codebook=table)
            err = (w_use - base).reshape(-1)
            idx = err.abs().topk(n_outliers).indices.sort().values
            side = SideChannels(outliers=SparseValues(idx, err[idx].half()))
        fq = insert_quantizer(gm, site.node, site.weight_use, QuantMeta("weight", site.node.name, site.path, spec),
                              block=block, scale=scale.half(), codebook=table.half(), side=side,
                              name=f"{site.weight.target}_scale", origin="test")
        site.node.replace_input_with(site.weight_use, fq.node)
    gm.recompile()
    return qm


CASES = [(3, None, 0), (4, None, 5), (3, 16, 0), (2, 8, 4), (4, 16, 3)]
IDS = ["cb3_channel", "cb4_channel_sparse", "cb3_g16", "cb2_g8_sparse", "cb4_g16_sparse"]


def _llm(family: str, wide: bool = False):
    """A tiny HF model; `wide`: 96 features, every weight over 8192 elements (torch.onnx's exporter folds
    constant subgraphs of smaller inputs: a toy-sized codebook weight would be decoded into the file)."""
    if wide:
        import transformers
        torch.manual_seed(0)
        cfg = (transformers.GPT2Config(n_embd=96, n_layer=1, n_head=4, n_positions=64, vocab_size=96)
               if family == "gpt2" else transformers.LlamaConfig(
                   hidden_size=96, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=96, max_position_embeddings=64))
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = toy.hf_model(family)
    ids = toy.token_ids()
    return qpass.apply(model, Recipe([]), example_inputs=(ids,), progress=False), ids


@pytest.mark.parametrize("bits,group,outliers", CASES, ids=IDS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_codebook_linears_store_b_bit_codes_and_match_fake_quant(family, bits, group, outliers):
    from qpass.backends.torch_packed.codebook import CodebookLinear
    qm, ids = _llm(family)
    codebook_quantize(qm, bits, group, outliers)
    ref = qm(ids).logits
    pm = qpass.lower(qm, "torch")
    mods = [m for m in pm.graph_module.modules() if isinstance(m, CodebookLinear)]
    assert len(mods) == len(quantizers(qm.graph_module, role="weight")) > 0
    assert not [n for n in pm.graph_module.graph.nodes if Quantizer.of(n)]
    torch.testing.assert_close(pm(ids).logits, ref, rtol=0, atol=2e-5)
    for m in mods:                                       # bytes: codes at b bits, fp16 tables and scales
        codes = m.qweight.numel() * m.qweight.element_size()
        assert codes == pytest.approx(m.n * m.k * bits / 8, rel=0.15)
        assert m.codebook.dtype == m.scale.dtype == torch.float16
        assert m.codebook.shape[-1] == 2 ** bits
        if outliers:
            assert m.outlier_index.dtype == torch.int32 and m.outlier_value.dtype == torch.float16


def test_codebook_bytes_are_saved_for_real():
    """The lowered state dict of a 3-bit per-channel codebook model: the linears' bytes are codes at 3 bits plus
    tables, scales and bias, against the float linears' 32 bits."""
    from qpass.backends.torch_packed.codebook import CodebookLinear
    qm, ids = _llm("llama")
    floats = sum(param_of(qm.graph_module, s.weight).numel() * 4 for s in linear_sites(qm.graph_module)
                 if s.path != "lm_head")
    codebook_quantize(qm, 3, None)
    pm = qpass.lower(qm, "torch")
    mods = [m for m in pm.graph_module.modules() if isinstance(m, CodebookLinear)]
    stored = sum(t.numel() * t.element_size() for m in mods for t in m.state_dict().values())
    weights = sum(m.n * m.k for m in mods)
    tables = sum(m.codebook.numel() * 2 + m.scale.numel() * 2 for m in mods)
    assert stored == sum(m.qweight.numel() for m in mods) + tables
    assert stored * 8 / weights < 3 + 8 * tables / weights + 0.3     # bit planes of 3 bits: K padded to 8
    assert stored < floats / 3          # 32-wide toy rows: the 8-entry fp16 tables are 4 of the bits per weight
    report = pm.weight_bytes()          # the model's byte report counts the codebook linears too
    assert report["codebook_linears"] == len(mods) and report["linears"] >= len(mods)
    assert report["packed"] >= sum(m.weight_bytes() for m in mods) and report["fp32"] >= 4 * weights


@pytest.mark.parametrize("family,bits,group,outliers", [("llama", *CASES[1]), ("gpt2", *CASES[3])],
                         ids=[f"llama-{IDS[1]}", f"gpt2-{IDS[3]}"])
def test_onnx_codebook_is_gather_matmul_with_parity_in_onnxruntime(family, bits, group, outliers, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    qm, ids = _llm(family, wide=True)
    codebook_quantize(qm, bits, group, outliers)
    ref = qm(ids).logits
    art = qpass.lower(qm, "onnx", tmp_path / "m", decoder=False)   # hand-made quantizers: no plans to re-apply
    assert all("Gather(table) + MatMul" in r.form for r in art.report.rows), art.report.rows
    model = onnx.load(art.model_path)
    ops = [n.op_type for n in model.graph.node]
    n_lin = len(art.report.rows)
    assert ops.count("Gather") >= n_lin and ops.count("ScatterND") == (n_lin if outliers else 0)
    u8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2]
    assert len(u8) == n_lin
    sess = ort.InferenceSession(art.model_path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-5)


def test_onnx_accepts_sparse_values_on_an_int_format():
    """Sparse values on an int weight (SpQR, QuantEase outliers) lower through onnx_qdq/side_channels.py."""
    pytest.importorskip("onnxscript")
    from qpass.backends.onnx_qdq import patterns
    qm, _ = _llm("llama")
    gm = qm.graph_module
    site = linear_sites(gm)[0]
    w = param_of(gm, site.weight).detach()
    spec = QSpec(F.get_format("int4"), PerChannel(0))
    scale = w.abs().amax(1, keepdim=True) / 7
    fq = insert_quantizer(gm, site.node, site.weight_use, QuantMeta("weight", site.node.name, site.path, spec),
                          block=[1, -1], scale=scale, name="w_scale", origin="test",
                          side=SideChannels(outliers=SparseValues(torch.tensor([0]), torch.tensor([0.5]))))
    site.node.replace_input_with(site.weight_use, fq.node)
    gm.recompile()
    patterns.check_supported(gm)                    # no error (was refused before side_channels.py)


def test_tiled_forward_equals_the_whole_weight(monkeypatch):
    """CodebookLinear decodes a tile of rows at a time (sparse values by binary search): the same outputs as the
    whole decoded weight, including tiles that hold no sparse value."""
    from qpass.backends.torch_packed import codebook as C
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    scale = w.abs().amax(1, keepdim=True).half()
    table = torch.linspace(-1, 1, 8).expand(40, 1, 8).contiguous().half()
    idx = torch.tensor([900, 5, 300, 30])                  # unsorted, rows 37, 0, 12, 1
    mod = C.CodebookLinear.from_weight(w, scale=scale, block=[1, -1], fmt="codebook3", codebook=table,
                                       outliers=(idx, torch.tensor([1.0, -2.0, 3.0, 0.5]).half()), bias=None)
    x = torch.randn(3, 24, generator=g)
    whole = x @ mod.weight().t()
    monkeypatch.setattr(C, "TILE_ELEMENTS", 24 * 7)       # tiles of 7 rows
    torch.testing.assert_close(mod(x), whole, rtol=0, atol=1e-6)
    ref = F.fake_quantize_ext(w, scale.float(), None, (1, -1), "codebook3", codebook=table.float(),
                              outliers=(idx, torch.tensor([1.0, -2.0, 3.0, 0.5])))
    assert torch.equal(mod.weight(), ref)
