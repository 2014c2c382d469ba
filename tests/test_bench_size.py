"""tools/bench_size.py --size small: every code path of the real-size benchmark in seconds (rows, bytes read per
token, bandwidth fraction, the docs section it writes); the 0.5 B run itself is in docs/benchmarks.md."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("qpass_tool_bench_size", ROOT / "tools" / "bench_size.py")
bench_size = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_size)


def test_options():
    args = bench_size.parse_args(["--size", "small", "--rows", "eager,w4a16_g128,ort_w4", "--no-onnx"])
    assert args.want == ["eager", "w4a16_g128"] and args.bandwidth_mb == 32 and args.threads == 1
    with pytest.raises(SystemExit):
        bench_size.parse_args(["--rows", "eager,nope"])
    assert bench_size.SIZES["0.5b"] == dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                            num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)


def test_small_run_writes_its_section(tmp_path, capsys):
    doc = tmp_path / "bench.md"
    doc.write_text("# x\n\n<!-- BEGIN bench-size -->\nold\n<!-- END bench-size -->\ntail\n")
    code = bench_size.main(["--size", "small", "--rows", "eager,graph,w4a16_g128_lmhead4", "--no-onnx",
                            "--repeats", "1", "--prompt", "8", "--new-tokens", "4", "--out", str(doc)])
    assert code == 0
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- END bench-size -->\ntail\n")
    for row in ("FP32 eager (transformers) | torch eager", "FP32 graph (qpass decode loop)",
                "W4A16 g128 + lm_head int4 packed"):
        assert row in text
    assert "bytes read / token" in text and "of read bw" in text and "python tools/bench_size.py --size small" in text
    assert "W4A16 with lm_head in int4, decode vs FP32 eager" in text and "bandwidth limit:" in text
    # the packed row's linears timed alone; the float rows have none
    assert "linears ms / token" in text and "rest ms / token" in text
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if " | torch " in line}
    lin = cells["W4A16 g128 + lm_head int4 packed"]
    assert float(lin[-3]) > 0 and lin[-2].endswith("%")
    assert cells["FP32 eager (transformers)"][-3:-1] == ["-", "-"]


def test_packed_linears_are_the_lowered_graphs_in_step_order():
    import torch

    import qpass
    from qpass.backends import torch_packed as tp

    model = bench_size.synthetic_llama("small")
    pm = tp.lower(qpass.apply(model, ROOT / "recipes" / "w4a16_g128.yaml", progress=False), kernels="reference")
    lins = bench_size.packed_linears(pm.graph_module)
    assert len(lins) == 7 * model.config.num_hidden_layers + 1            # + lm_head, left fp32 by this recipe
    assert [x.shape[-1] for _, x in lins[:7]] == [128, 128, 128, 128, 128, 128, 352]   # q k v o gate up down
    head, x = lins[-1]
    assert torch.equal(head(x), model.lm_head(x)) and head.tensors() == [pm.graph_module.get_parameter(
        next(n.target for n in pm.graph_module.graph.nodes if n.op == "get_attr" and "lm_head" in n.target))]
    row = bench_size.Row("w4a16_g128", None, "torch packed", 0, 0.0, lins)
    packed = sum(bench_size._tensor_bytes(list(m.parameters()) + list(m.buffers())) for m, _ in lins[:-1])
    assert row.linear_bytes == packed + model.lm_head.weight.numel() * 4


def test_bytes_per_token_skips_the_embedding_table():
    import qpass
    from qpass.backends import torch_packed as tp

    model = bench_size.synthetic_llama("small")
    emb = model.get_input_embeddings().weight
    qm = qpass.apply(model, ROOT / "recipes" / "w4a16_g128_lmhead4.yaml", progress=False)
    pm = tp.lower(qm, kernels="reference")
    got = bench_size.graph_bytes_per_token(pm.graph_module)
    everything = bench_size._tensor_bytes(list(pm.graph_module.parameters()) + list(pm.graph_module.buffers()))
    assert got == everything - emb.numel() * emb.element_size()
    assert got < pm.weight_bytes()["fp32"] / 4          # int4 everywhere, lm_head included


def test_bench_py_keeps_the_section_when_it_rewrites_the_file(tmp_path):
    spec = importlib.util.spec_from_file_location("qpass_tool_bench", ROOT / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "b.md"
    doc.write_text("old run\n<!-- BEGIN bench-size -->\n| a | b |\nkept\n<!-- END bench-size -->\nmore\n")
    lines = bench.real_size_section(str(doc))
    assert lines[2:6] == ["<!-- BEGIN bench-size -->", "| a | b |", "kept", "<!-- END bench-size -->"]
    fresh = bench.real_size_section(str(tmp_path / "none.md"))
    assert "tools/bench_size.py --out" in fresh[3] and fresh[4] == "<!-- END bench-size -->"
    # the 2-thread table (--section bench-size-2t) is kept too, right after the first
    doc.write_text(doc.read_text() + "<!-- BEGIN bench-size-2t -->\ntwo threads\n<!-- END bench-size-2t -->\n")
    lines = bench.real_size_section(str(doc))
    i = lines.index("<!-- BEGIN bench-size-2t -->")
    assert lines[i + 1: i + 3] == ["two threads", "<!-- END bench-size-2t -->"] and i > lines.index(
        "<!-- END bench-size -->")


def test_bench_py_keeps_every_other_tools_section(tmp_path):
    spec = importlib.util.spec_from_file_location("qpass_tool_bench", ROOT / "tools" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "b.md"
    doc.write_text("x\n<!-- BEGIN bench-qlora -->\nq rows\n<!-- END bench-qlora -->\n"
                   "<!-- BEGIN kernel-accuracy -->\nk rows\n<!-- END kernel-accuracy -->\n")
    names = [k[0] for k in bench.KEPT_SECTIONS]
    assert names == ["bench-size", "kernel-accuracy", "bench-qlora"]
    got = {k[0]: bench.kept_section(str(doc), *k) for k in bench.KEPT_SECTIONS}
    assert got["bench-qlora"][3] == "q rows" and got["kernel-accuracy"][3] == "k rows"
    assert "tools/bench_size.py" in got["bench-size"][3]            # absent: says how to make it



def test_small_onnx_rows_compare_with_onnxruntimes_quantizer(tmp_path):
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    doc = tmp_path / "bench.md"
    doc.write_text("<!-- BEGIN bench-size -->\n<!-- END bench-size -->\n")
    code = bench_size.main(["--size", "small", "--rows", "ort_w4,ort_nbits,ort_nbits_qpass", "--repeats", "1",
                            "--prompt", "8", "--new-tokens", "4", "--onnx-sessions", "2", "--work",
                            str(tmp_path / "work"), "--out", str(doc)])
    assert code == 0
    text = doc.read_text()
    for label in ("qpass W4A16 g128 ONNX (MatMulNBits)", "ORT MatMulNBitsQuantizer g128 (torch.onnx FP32 export)",
                  "ORT MatMulNBitsQuantizer g128 (qpass FP32 ONNX)", "2 onnxruntime sessions each",
                  "vs onnxruntime's MatMulNBitsQuantizer model (of torch.onnx's FP32 export)", "a tie by construction"):
        assert label in text
    work = sorted(p.name for p in (tmp_path / "work").iterdir())    # one FP32 export per attention option
    assert work == ["ort_nbits_acc4.grouped.onnx", "ort_nbits_acc4.torch.onnx", "w16.grouped", "w16.torch",
                    "w4a16_g128.grouped"]
