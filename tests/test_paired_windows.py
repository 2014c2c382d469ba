"""tools/paired_windows.py: per-window scores and paired bootstrap intervals on a toy model directory."""
import json

import pytest

from tests import toy

TEXT = "the quick brown fox jumps over the lazy dog. " * 30
W4 = ("version: 1\npasses:\n  - quantize:\n      weights: {bits: 4, granularity: per_channel, symmetric: true}\n"
      "      ignore: [lm_head]\n")
W2 = W4.replace("bits: 4", "bits: 2")


def test_scores_compares_and_resumes(tmp_path, capsys):
    from tools import paired_windows as pw

    d = tmp_path / "llama"
    toy.save_hf_dir(d, "llama")
    (d / "eval.txt").write_text(TEXT)
    (d / "calib.txt").write_text(TEXT * 2)
    (d / "qpass_data.json").write_text(json.dumps({"eval": "eval.txt", "calib": "calib.txt"}))
    (tmp_path / "w4.yaml").write_text(W4)
    (tmp_path / "w2.yaml").write_text(W2)
    out = tmp_path / "rows.json"
    common = [str(d), "--window", "16", "--calib-samples", "2", "--json", str(out), "--bootstrap", "200"]
    assert pw.main([*common, "--recipe", f"w4={tmp_path / 'w4.yaml'}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"FP32", "w4"} and len(rows["w4"]["nll"]) == len(rows["FP32"]["nll"]) > 3
    assert all(k == 0 for k in rows["FP32"]["kl"])
    # a second run adds a row to the same file and compares rows of both runs
    assert pw.main([*common, "--recipe", f"w2={tmp_path / 'w2.yaml'}", "--compare", "w2:w4", "--compare",
                    "w4:w4", "--gap", "w2:w4"]) == 0
    text = capsys.readouterr().out
    assert "w2 − w4: perplexity" in text and "w4 − w4: perplexity +0.000 [95% CI +0.000, +0.000]" in text
    assert "closes" in text and set(json.loads(out.read_text())["rows"]) == {"FP32", "w4", "w2"}
    rows = json.loads(out.read_text())["rows"]
    res = pw.compare(rows, [("w2", "w4")], [("w2", "w4")], n_boot=200)
    lo, hi = res[0]["ppl_ci"]
    assert lo <= res[0]["ppl"] <= hi
    fp, w2, w4 = (float(pw._totals(rows[k])[0]) for k in ("FP32", "w2", "w4"))
    assert res[0]["ppl"] == pytest.approx(w2 - w4) and res[1]["fraction"] == pytest.approx((w2 - w4) / (w2 - fp))
    with pytest.raises(SystemExit):
        pw.main([*common, "--compare", "w2:nope"])
