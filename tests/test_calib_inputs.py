"""Calibration samples the model cannot take are refused before any pass runs (issue 13, part 3), with the
sample's index and the limit (vocabulary size, positions, dtype, rank) in a CalibrationError."""
import os

import pytest
import torch

import qpass
from qpass import CalibrationError, Recipe
from qpass.calibration import graph_inputs, sequence_limit
from qpass.passes import QuantizeConfig, SmoothQuantConfig
from qpass.primitives.spec import IntFormat, PerTensor, QSpec
from tests import toy

STATIC = QuantizeConfig(activations=QSpec(IntFormat(8), PerTensor()))
# smoothquant first: before the check, a bad sample failed inside it as PassError(IndexError)
RECIPE = Recipe([SmoothQuantConfig(alpha=0.5), STATIC])
GOOD = toy.token_ids()

# (bad sample, words the message must contain); toy models: vocab 96, 64 positions
BAD = {
    "id = vocab": (torch.tensor([[1, 2, 96, 3]]), ["calib_data[1]", "token id 96 at [0, 2]", "96 tokens", "0..95"]),
    "id > vocab": (torch.tensor([5, 50_000]), ["calib_data[1]", "token id 50000 at [0, 1]", "not in the vocabulary"]),
    "negative id": (torch.tensor([[-1, 4]]), ["calib_data[1]", "token id -1 at [0, 0]", "is negative"]),
    "too long": (torch.randint(0, 96, (1, 65)), ["calib_data[1]", "65 tokens", "at most 64 tokens",
                                                  "max_position_embeddings"]),
    "zero length": (torch.zeros(1, 0, dtype=torch.long), ["calib_data[1] is empty", "[1, 0]"]),
    "zero length 1-D": (torch.zeros(0, dtype=torch.long), ["calib_data[1] is empty"]),
    "float": (torch.rand(1, 8), ["calib_data[1]", "float32", "integer token ids"]),
    "float ids": (torch.tensor([[1.0, 2.0]]), ["calib_data[1]", "float32", "tokenize"]),
    "bool": (torch.ones(1, 4, dtype=torch.bool), ["calib_data[1]", "bool"]),
    "3-D": (torch.randint(0, 96, (1, 2, 8)), ["calib_data[1]", "[1, 2, 8]", "[batch, seq]"]),
    "two tensors": ((toy.token_ids(), toy.token_ids()), ["calib_data[1]", "2 tensor(s)", "takes 1"]),
    "dict": ({"input_ids": torch.tensor([[3, 99]])}, ["calib_data[1]", "token id 99"]),
}


def message(model, sample, recipe=RECIPE, **kw) -> str:
    with pytest.raises(CalibrationError) as e:
        qpass.apply(model, recipe, calib_data=[GOOD, sample], progress=False, **kw)
    return str(e.value)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("case", BAD, ids=BAD)
def test_bad_samples_are_refused_with_the_sample_and_the_limit(family, case):
    sample, words = BAD[case]
    msg = message(toy.captured(family)[1], sample)
    for w in words:
        assert w in msg, msg
    assert "in pass" not in msg and "failed after" not in msg     # before any pass, not inside one


def test_the_embedding_is_named():
    msg = message(toy.captured("opt")[1], torch.tensor([[96]]))
    assert "model.decoder.embed_tokens" in msg


def test_an_hf_model_is_checked_like_its_graph():
    msg = message(toy.hf_model("gpt2"), torch.randint(0, 96, (1, 65)))
    assert "65 tokens" in msg and "at most 64" in msg


def test_samples_at_the_limits_are_accepted():
    gm = toy.captured("llama")[1]
    edge = [torch.tensor([[0, 95]]), torch.randint(0, 96, (1, 64)), torch.tensor([7]),
            torch.tensor([[1, 2]], dtype=torch.int32)]
    qm = qpass.apply(gm, Recipe([STATIC]), calib_data=edge, progress=False)
    assert qm.report["quantize"].stats["inputs_quantized"] > 0


def test_limits_read_from_the_graph():
    (ids,) = graph_inputs(toy.captured("llama")[1])
    assert ids.vocab_size == 96 and ids.embedding == "model.embed_tokens" and ids.sizes[1] == (1, 64)
    assert sequence_limit(toy.captured("gpt2")[1])[0] == 64


def test_continuing_from_a_quantized_model_checks_too():
    qm = qpass.apply(toy.captured("llama")[1], Recipe([QuantizeConfig(activations=None)]), progress=False)
    msg = message(qm, torch.tensor([[100]]), recipe=Recipe([QuantizeConfig(weights=None,
                                                                             activations=STATIC.activations)]))
    assert "token id 100" in msg


def test_streaming_checks_before_anything_is_written(tmp_path):
    src = toy.save_hf_dir(tmp_path / "src", tokenizer=False)
    out = tmp_path / "out"
    with pytest.raises(CalibrationError, match=r"calib_data\[1\] has token id 96 .* 96 tokens"):
        qpass.apply_from_disk(src, Recipe([STATIC]), out, calib_data=[GOOD, torch.tensor([[96]])], progress=False)
    with pytest.raises(CalibrationError, match=r"calib_data\[0\] has 65 tokens; .*at most 64"):
        qpass.apply_from_disk(src, Recipe([STATIC]), out, calib_data=[torch.randint(0, 96, (1, 65))], progress=False)
    assert not os.path.exists(out)


def test_non_hf_graph_inputs_are_checked_by_dtype_and_shape():
    gm = qpass.capture(toy.TinyMLP(), (toy.mlp_input(),))
    with pytest.raises(CalibrationError, match=r"calib_data\[0\] is a float64 tensor; the graph takes float32 \(x\)"):
        qpass.apply(gm, Recipe([STATIC]), calib_data=[(toy.mlp_input().double(),)], progress=False)
    with pytest.raises(CalibrationError, match=r"calib_data\[1\] has size 3 in dimension 1; the graph takes exactly"):
        qpass.apply(gm, Recipe([STATIC]), calib_data=[(toy.mlp_input(),), (toy.mlp_input()[:, :3],)], progress=False)
    qpass.apply(gm, Recipe([STATIC]), calib_data=[(toy.mlp_input(),)], progress=False)   # the right input works


def test_a_graph_without_example_values_is_not_checked():
    gm = torch.fx.symbolic_trace(toy.TinyMLP())            # placeholders carry no shapes: nothing to check
    qm = qpass.apply(gm, Recipe([]), calib_data=[(toy.mlp_input(),)], progress=False)
    assert len(qm.report) == 0
