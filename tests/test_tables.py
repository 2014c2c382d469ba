"""qpass.tables: the one table renderer (Markdown and fixed-width text) and the docs writers; the tables the
tools and qpass.eval print stay byte for byte what they were."""
import importlib.util
import pathlib
import re

import pytest

from qpass import tables
from qpass.tables import check_section, markdown, replace_section, text, write_atomic

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tool_module(name: str):
    spec = importlib.util.spec_from_file_location(f"qpass_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ markdown


def test_markdown_rule_and_alignment():
    rows = [["a", 1, 2.5], ["b", None, "x"]]
    assert markdown(["name", "n", "v"], rows) == (
        "| name | n | v |\n|---|---|---|\n| a | 1 | 2.5 |\n| b | None | x |")
    assert markdown(["name", "n", "v"], rows, "lrc").splitlines()[1] == "|---|---:|:---:|"
    assert markdown(["name", "n", "v"], rows, "lrr", spaced_rule=True).splitlines()[1] == "| --- | ---: | ---: |"


def test_markdown_escapes_pipes_and_newlines():
    out = markdown(["max |Δ|", "note"], [["a|b", "two\nlines"], ["", "\\|"]])
    assert out.splitlines() == ["| max \\|Δ\\| | note |", "|---|---|", "| a\\|b | two lines |", "|  | \\\\| |"]
    for line in out.splitlines():          # every row splits into the header's columns
        assert len(re.split(r"(?<!\\)\|", line)) == 4


def test_markdown_empty_and_bad_shapes():
    assert markdown(["a", "b"], []) == "| a | b |\n|---|---|"
    assert markdown(["a", "b"], iter([])) == "| a | b |\n|---|---|"
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        markdown(["a", "b"], [["x", "y"], ["z"]])
    with pytest.raises(ValueError, match="align 'lx'"):
        markdown(["a", "b"], [], "lx")
    with pytest.raises(ValueError, match="align 'l'"):
        markdown(["a", "b"], [], "l")


# ---------------------------------------------------------------------------------- text


def _report_text(head, body):
    """Report.__str__'s table as it was written by hand (qpass/pass_infra.py before qpass.tables)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body])


def test_text_widths_are_the_widest_cell_of_each_column():
    head = ["pass", "nodes +/-", "time", "verify max|Δ|", "stats"]
    body = [["quantize", "+12/-0", "0.12s", "-", "linears=7"], ["smoothquant_with_a_long_name", "+0/-0", "1.50s",
                                                                  "3.1e-05", ""]]
    out = text(head, body)
    assert out == _report_text(head, body)
    lines = out.splitlines()
    assert lines[0].startswith("pass" + " " * (len("smoothquant_with_a_long_name") - 4) + "  nodes +/-")
    assert lines[1].split("  ") == ["-" * 28, "-" * 9, "-" * 5, "-" * 13, "-" * 9]
    assert len({len(ln) for ln in lines}) == 1           # every line padded to the same width
    assert text(["a", "bb"], []) == "a  bb\n-  --"
    assert text(["a", "b"], [[1, "x"]], sep=" | ") == "a | b\n- | -\n1 | x"


# ------------------------------------------------------------------ the tables the code prints


def test_eval_table_is_unchanged():
    from qpass.eval import markdown as eval_markdown

    rows = [dict(name="FP32", perplexity=109.6412, kl=0.0, top1_agreement=1.0, linear_weight_bytes=12345678,
                 bits_per_weight=32.0, quantized_bits_per_weight=None),
            dict(name="w4a16_g128.yaml", perplexity=110.2, kl=0.012345, top1_agreement=0.98765,
                 linear_weight_bytes=2345678, bits_per_weight=6.123, quantized_bits_per_weight=4.125)]
    assert eval_markdown(rows) == (
        "| recipe | perplexity | KL(FP‖Q)/token | top-1 agreement | linear weight bytes | bits/weight, all linears "
        "| bits/weight, quantized linears |\n|---|---|---|---|---|---|---|\n"
        "| FP32 | 109.641 | 0.00000 | 100.00% | 12,345,678 | 32.00 | – |\n"
        "| w4a16_g128.yaml | 110.200 | 0.01235 | 98.77% | 2,345,678 | 6.12 | 4.12 |")


def test_bench_onnx_tables():
    bench_onnx = tool_module("bench_onnx")
    rows = [dict(variant="FP32 (ONNX, same exporter)", prefill_tok_s=1234.5, decode_tok_s=200.25, perplexity=109.6,
                 kl=0.0, top1=1.0, bytes=40e6),
            dict(variant="qpass W4A16 g128, acc 0", prefill_tok_s=2234.5, decode_tok_s=300.25, perplexity=109.8,
                 kl=0.00123, top1=0.991, bytes=10e6)]
    assert bench_onnx.table(rows) == (
        "| variant | prefill tok/s | x FP32 | decode tok/s | x FP32 | perplexity | KL(FP‖Q)/token | top-1 = FP | "
        "model bytes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| FP32 (ONNX, same exporter) | 1234 | 1.00x | 200.2 | 1.00x | 109.600 | 0.00000 | 100.00% | 40.0 MB |\n"
        "| qpass W4A16 g128, acc 0 | 2234 | 1.81x | 300.2 | 1.50x | 109.800 | 0.00123 | 99.10% | 10.0 MB |")
    # the parity header's |Δlogit| is escaped now: the table renders as Markdown (it was printed raw before)
    assert bench_onnx.parity_table([dict(recipe="w8a8.yaml", max=0.0938, mean=0.00477, ppl_ort=109.646,
                                         ppl_fq=109.652)]) == (
        "| recipe | max \\|Δlogit\\| | mean \\|Δlogit\\| | perplexity ORT | perplexity fake-quant |\n"
        "|---|---:|---:|---:|---:|\n| w8a8.yaml | 0.0938 | 0.00477 | 109.646 | 109.652 |")


def _split(line: str) -> list[str]:
    return line[2:-2].split(" | ")


def test_benchmarks_doc_tables_render_the_same():
    """docs/benchmarks.md is written by tools/bench.py alone: its tables come out of the renderer unchanged."""
    lines = (ROOT / "docs" / "benchmarks.md").read_text().split("\n")
    found, block = [], []
    for ln in lines + [""]:
        if ln.startswith("|"):
            block.append(ln)
        elif block:
            found.append(block)
            block = []
    assert found
    for block in found:
        align = "".join("r" if c == "---:" else "l" for c in _split(block[1]))
        assert markdown(_split(block[0]), [_split(r) for r in block[2:]], align, spaced_rule=True) == "\n".join(block)


# ------------------------------------------------------------------------------ docs files


def test_replace_section(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n<!-- BEGIN parity -->\nold table\n<!-- END parity -->\n\nafter\n")
    assert replace_section(doc, "parity", "| a |\n|---|\n| 1 |\n") is True
    assert doc.read_text() == ("# Title\n\n<!-- BEGIN parity -->\n| a |\n|---|\n| 1 |\n<!-- END parity -->\n\n"
                               "after\n")
    assert replace_section(doc, "parity", "| a |\n|---|\n| 1 |") is False      # unchanged: not rewritten
    assert replace_section(doc, "parity", "") is True
    assert doc.read_text() == "# Title\n\n<!-- BEGIN parity -->\n<!-- END parity -->\n\nafter\n"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content, missing", [
    ("no markers at all\n", "no line '<!-- BEGIN parity -->'"),
    ("<!-- BEGIN parity -->\nbody\n", "no line '<!-- END parity -->'"),
    ("<!-- END parity -->\n<!-- BEGIN parity -->\n", "comes before"),
    ("<!-- BEGIN parity -->\n<!-- END parity -->\n<!-- BEGIN parity -->\n", "more than one line '<!-- BEGIN"),
    ("<!-- BEGIN other -->\n<!-- END other -->\n", "no line '<!-- BEGIN parity -->'"),
])
def test_replace_section_refuses_without_its_markers(tmp_path, content, missing):
    doc = tmp_path / "doc.md"
    doc.write_text(content)
    with pytest.raises(ValueError, match=re.escape(missing)) as e:
        replace_section(doc, "parity", "new")
    assert str(doc) in str(e.value)
    assert doc.read_text() == content                      # nothing written
    with pytest.raises(ValueError, match=re.escape(missing)):   # the same check, before a tool's measurements
        check_section(doc, "parity")


def test_check_section_passes_where_replace_section_would_write(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- BEGIN parity -->\nold\n<!-- END parity -->\n")
    assert check_section(doc, "parity") is None and doc.read_text().count("old") == 1


def test_write_atomic(tmp_path):
    path = tmp_path / "out.md"
    write_atomic(path, "one ‖ two\n")
    write_atomic(path, "three\n")
    assert path.read_text(encoding="utf-8") == "three\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.md"]
    assert tables.markers("x") == ("<!-- BEGIN x -->", "<!-- END x -->")
