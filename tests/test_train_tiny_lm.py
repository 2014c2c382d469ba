"""Tests for tools/train_tiny_lm.py, tools/prepare_corpus.py and the bundled tiny models."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import prepare_corpus  # noqa: E402
import train_tiny_lm  # noqa: E402

TINY = {
    "llama": ["--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
              "--intermediate", "88"],
    "opt": ["--hidden", "32", "--layers", "2", "--heads", "4", "--intermediate", "64",
            "--max-positions", "64", "--dropout", "0.1"],
}


@pytest.fixture(scope="module")
def tiny_texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    calib = (REPO / "data" / "austen" / "calib.txt").read_text(encoding="utf-8")
    ev = (REPO / "data" / "austen" / "eval.txt").read_text(encoding="utf-8")
    (d / "train.txt").write_text(calib[:30_000], encoding="utf-8")
    (d / "eval.txt").write_text(ev[:6_000], encoding="utf-8")
    return d


def _run(arch, texts, out, seed=0, steps=4):
    args = ["--arch", arch, "--train-file", str(texts / "train.txt"),
            "--eval-file", str(texts / "eval.txt"), "--out", str(out),
            "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
            "--steps", str(steps), "--eval-every", "2", "--eval-windows", "2",
            "--seed", str(seed), "--progress-interval", "1000", *TINY[arch]]
    return train_tiny_lm.main(args)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_same_command_gives_identical_weights(arch, tiny_texts, tmp_path):
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    s1 = _run(arch, tiny_texts, tmp_path / "a")
    s2 = _run(arch, tiny_texts, tmp_path / "b")
    s3 = _run(arch, tiny_texts, tmp_path / "c", seed=1)
    # global torch state restored after an in-process run
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det

    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    c = (tmp_path / "c" / "model.safetensors").read_bytes()
    assert a == b, "same command must give bit-identical weights"
    assert a != c, "a different seed must give different weights"
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert s1["heldout_fp16"] == s2["heldout_fp16"]
    assert s1["steps"] == 4 and s3["steps"] == 4

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "opt": "OPTForCausalLM"}[arch]
    assert model.dtype == torch.float16
    assert len(tok) == 300
    text = "It is a truth universally acknowledged."
    assert tok.decode(tok(text)["input_ids"]) == text


class _UniformLM(torch.nn.Module):
    """Returns all-zero logits: every token has probability 1/V, so NLL = log V per token."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(tuple(input_ids.shape))

        class Out:
            pass

        o = Out()
        o.logits = torch.zeros(*input_ids.shape, self.vocab)
        return o


def test_heldout_nll_uses_non_overlapping_windows_with_partial_last():
    m = _UniformLM(50)
    ids = list(range(600))  # windows: 256, 256, 88
    nll, n = train_tiny_lm.heldout_nll(m, [i % 50 for i in ids], window=256)
    assert n == 255 + 255 + 87
    assert math.isclose(nll / n, math.log(50), rel_tol=1e-6)
    assert sorted(m.calls) == [(1, 88), (2, 256)]


def test_lr_schedule_warmup_and_cosine():
    peak = 1e-3
    lrs = [train_tiny_lm.lr_at(s, 100, 10, peak, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(peak / 10)
    assert lrs[9] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def _xdr_strsxp(strings):
    out = b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300)
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        raw = s.encode()
        out += struct.pack(">ii", 9 | (1 << 15), len(raw)) + raw  # CHARSXP, UTF8 flag
    return out


def test_r_unserialize_character_vector():
    obj = prepare_corpus.r_unserialize(_xdr_strsxp(["Emma", "Woodhouse, handsome"]))
    assert obj.rtype == 16 and obj.value == ["Emma", "Woodhouse, handsome"]


def test_normalise_joins_hard_wrapped_paragraphs():
    lines = ["It is a truth", "universally \u201cacknowledged\u201d", "", "", "Next\u2014para."]
    assert prepare_corpus.normalise(lines) == 'It is a truth universally "acknowledged"\nNext--para.\n'


@pytest.mark.parametrize("corpus", ["austen", "mobydick"])
def test_committed_splits_do_not_overlap(corpus):
    d = REPO / "data" / corpus
    ev = (d / "eval.txt").read_text(encoding="utf-8")
    calib = (d / "calib.txt").read_text(encoding="utf-8")
    assert 100_000 <= len(ev.encode()) <= 300_000
    assert 50_000 <= len(calib.encode()) <= 100_000
    ev_paras = {p for p in ev.splitlines() if len(p) > 80}
    assert not [p for p in calib.splitlines() if p in ev_paras]
    train = d / "train.txt"  # regenerated, not committed: check when present
    if train.exists():
        t = train.read_text(encoding="utf-8")
        assert calib in t
        train_paras = {p for p in t.splitlines() if len(p) > 80}
        assert not (ev_paras & train_paras)


# name: (class, corpus, bound on the recorded full held-out ppl; see models/README.md)
SHIPPED = {"tiny-llama": ("LlamaForCausalLM", "austen", 100.0),
           "tiny-opt": ("OPTForCausalLM", "mobydick", 300.0)}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads_and_is_a_real_lm(name):
    d = REPO / "models" / name
    if not (d / "model.safetensors").exists():
        pytest.skip(f"{d} not built")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, corpus, ppl_bound = SHIPPED[name]
    assert (d / "model.safetensors").stat().st_size <= 25 * 2**20
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    assert type(model).__name__ == arch
    ev = (REPO / "data" / corpus / "eval.txt").read_text(encoding="utf-8")
    ids = tok(ev[:3000], add_special_tokens=False)["input_ids"][:512]
    assert len(ids) == 512
    nll, n = train_tiny_lm.heldout_nll(model, ids, window=256)
    ppl = math.exp(nll / n)
    assert ppl < 0.1 * len(tok), ppl  # a trained LM, far below the uniform baseline (4096)
    summary = json.loads((d / "training_log.json").read_text())["summary"]
    assert summary["heldout_fp16"]["window"] == 256
    assert summary["heldout_fp16"]["ppl"] < ppl_bound
