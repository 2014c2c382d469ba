import math
import os

import pytest
import torch

import qpass
from qpass.eval import compare, perplexity, weight_bytes, windows
from tests import toy


def test_windows_are_consecutive_and_keep_a_partial_tail():
    ws = windows(torch.arange(11), 4)
    assert [w.tolist() for w in ws] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [w.tolist() for w in windows(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 1-token tail dropped
    with pytest.raises(ValueError):
        windows(torch.arange(5), 1)


def test_perplexity_matches_a_hand_computed_case():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])   # next-token table

    def bigram(ids):
        return probs[ids].log()

    ids = torch.tensor([0, 1, 2, 2, 0])       # windows of 3: [0,1,2] and [2,0]
    res = perplexity(bigram, ids, window=3)
    nll = -(math.log(0.25) + math.log(0.1)) - math.log(0.2)   # p(1|0), p(2|1); p(0|2); no cross-window term
    assert res.tokens == 3
    assert res.nll == pytest.approx(nll)
    assert res.perplexity == pytest.approx(math.exp(nll / 3))


def test_compare_of_a_model_with_itself():
    model = toy.hf_model("llama")
    c = compare(model, model, toy.token_ids(1, 40)[0], window=16)
    assert c["kl"] == pytest.approx(0.0, abs=1e-7) and c["top1_agreement"] == 1.0 and c["tokens"] == 40


def test_weight_bytes_of_fp_and_int4_models():
    model = toy.hf_model("llama")
    fp = weight_bytes(model)
    assert fp["bits_per_weight"] == 32.0
    qm = qpass.apply(model, {"passes": [{"quantize": {"weights": {"bits": 4, "granularity": "per_group",
                                                                  "group_size": 16}}}]})
    q = weight_bytes(qm)
    assert q["linear_weights"] == fp["linear_weights"]
    assert 4.0 < q["bits_per_weight"] < 4.0 + 16 / 16 + 0.2      # 4 bits + one fp16 scale per 16 weights


def test_evaluate_agrees_with_perplexity_and_compare():
    from qpass.eval import evaluate

    model = toy.hf_model("llama")
    ids = toy.token_ids(1, 70, seed=4)[0]
    rows = evaluate(model, ["recipes/w4a16_g128.yaml"], ids, ids, window=16, calib_samples=2, progress=False)
    qm = qpass.apply(model, "recipes/w4a16_g128.yaml")
    assert rows[0]["perplexity"] == pytest.approx(perplexity(model, ids, 16).perplexity, rel=1e-5)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[0]["top1_agreement"] == 1.0
    assert rows[1]["perplexity"] == pytest.approx(perplexity(qm, ids, 16).perplexity, rel=1e-5)
    c = compare(model, qm, ids, 16)
    assert rows[1]["kl"] == pytest.approx(c["kl"], rel=1e-4, abs=1e-8)
    assert rows[1]["top1_agreement"] == pytest.approx(c["top1_agreement"])


def test_weight_bytes_counts_learnable_scales_like_buffers():
    """PEQA / learnable_scales turn weight scales into parameters; the byte count must not care."""
    import qpass
    from qpass.eval import weight_bytes
    from qpass.passes.qat import make_scales_learnable
    from tests import toy

    qm = qpass.apply(toy.hf_model("llama"), {"passes": [{"quantize": {"weights": {"bits": 4,
                                                                       "granularity": "per_channel"}}}]})
    before = weight_bytes(qm.graph_module)
    make_scales_learnable(qm.graph_module)
    assert weight_bytes(qm.graph_module) == before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_peak_rss_is_the_blocks_own_peak():
    """The meter resets the high-water mark: a block that allocates 400 MB and frees it reads >= 400 MB more
    than a block that allocates nothing, even after the big one ran first."""
    from qpass.memory import PeakRss

    with PeakRss() as big:
        x = torch.ones(100_000_000)               # 400 MB, touched
        del x
    with PeakRss() as small:
        pass
    assert big.bytes is not None and small.bytes is not None
    assert big.bytes - small.bytes >= 350e6


def test_eval_table_shows_time_and_peak_memory_for_evaluated_rows():
    from qpass.eval import markdown

    fp = dict(name="FP32", perplexity=10.0, kl=0.0, top1_agreement=1.0, linear_weight_bytes=8, bits_per_weight=32.0,
              seconds=0.0)
    q = dict(fp, name="a.yaml", seconds=12.34, peak_rss=1.5e9, quantized_bits_per_weight=4.0)
    lines = markdown([fp, q]).split("\n")
    assert lines[0].endswith("| apply time (s) | peak RSS while applying (GB) |")
    assert lines[2].endswith("| – | – |") and lines[3].endswith("| 12.3 | 1.50 |")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_nested_peak_meters_keep_the_outer_peak():
    from qpass.memory import PeakRss

    with PeakRss() as outer:
        x = torch.ones(100_000_000)               # 400 MB before the inner meter resets the mark
        del x
        with PeakRss() as inner:
            pass
    assert outer.bytes - inner.bytes >= 350e6
