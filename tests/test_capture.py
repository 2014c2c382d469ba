import pytest
import torch
from torch import nn

import qpass
from qpass.graph import META_CAPTURE, linear_sites, module_path
from tests import toy


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_capture_equals_eager_at_other_shapes(family):
    model = toy.hf_model(family)
    gm = qpass.capture(model)
    for shape in [(3, 11), (1, 1), (2, 7)]:    # none equals the export example (2, 8)
        ids = toy.token_ids(*shape)
        with torch.no_grad():
            ref = model(ids).logits
            out = gm(ids).logits
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= 1e-5


EXPECTED = {   # linear-like sites per family: (count, op kinds, a module path that must be there)
    "llama": (2 * 7 + 1, {"aten.linear.default"}, "model.layers.0.self_attn.k_proj"),
    "mistral": (2 * 7 + 1, {"aten.linear.default"}, "model.layers.1.mlp.down_proj"),
    "qwen2": (2 * 7 + 1, {"aten.linear.default"}, "model.layers.0.self_attn.q_proj"),
    "opt": (2 * 6 + 1, {"aten.linear.default"}, "model.decoder.layers.0.fc1"),
    "gpt2": (2 * 4 + 1, {"aten.addmm.default", "aten.linear.default"}, "transformer.h.0.attn.c_attn"),
    "llama_tied": (2 * 7 + 1, {"aten.linear.default"}, "lm_head"),
}


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_linear_sites_are_found_structurally(family):
    gm = qpass.capture(toy.hf_model(family))
    sites = linear_sites(gm)
    n, kinds, path = EXPECTED[family]
    assert len(sites) == n
    assert {str(s.node.target) for s in sites} == kinds
    assert path in {s.path for s in sites}
    assert "lm_head" in {s.path for s in sites}


def test_gpt2_conv1d_weight_layout():
    gm = qpass.capture(toy.hf_model("gpt2"))
    site = next(s for s in linear_sites(gm) if s.path == "transformer.h.0.attn.c_attn")
    assert str(site.node.target) == "aten.addmm.default"
    w = gm.get_parameter(site.weight.target)
    assert w.shape == (32, 96)          # Conv1D stores [in, out]
    assert site.in_axis == 0 and site.use_in_axis == 0


class MatmulHead(nn.Module):
    """Falcon/Gemma-style: a matmul against a transposed parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))

    def forward(self, x):
        return torch.matmul(x, self.w.t())


def test_matmul_with_transposed_parameter_is_a_linear_site():
    gm = qpass.capture(MatmulHead(), (torch.randn(2, 3, 8),))
    (site,) = linear_sites(gm)
    assert str(site.node.target) == "aten.matmul.default"
    assert site.in_axis == 1 and site.weight_use is not site.weight


def test_tied_embeddings_stay_tied_in_the_graph():
    model = toy.hf_model("llama_tied")
    gm = qpass.capture(model)
    emb = dict(gm.named_parameters(remove_duplicate=False))
    names = [k for k in emb if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]
    assert len(names) == 2 and emb[names[0]] is emb[names[1]]


def test_module_paths_strip_the_wrapper():
    gm = qpass.capture(toy.hf_model("llama"))
    paths = {module_path(gm, n) for n in gm.graph.nodes}
    assert "model.layers.0.mlp.gate_proj" in paths
    assert not any(p.startswith("model.model.") for p in paths)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # data-dependent Python control flow: not exportable
            return x * 2
        return x


def test_capture_error_names_class_line_and_reason():
    with pytest.raises(qpass.CaptureError) as e:
        qpass.capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "x.sum() > 0" in msg
    assert "reason:" in msg and "fix:" in msg


def test_non_hf_module_needs_example_inputs():
    with pytest.raises(qpass.CaptureError, match="example_inputs"):
        qpass.capture(toy.TinyMLP())


# ------------------------------------------------------------- sequence ranges the model's code restricts

def test_mpt_alibi_table_captures_for_every_length_below_its_max_positions():
    """MPT slices an ALiBi table of max_seq_len (64) rows with table[max(0, 64 - seq):]: a no-op slice at
    seq == 64, so one graph cannot hold 1..64; capture retries with 1..63 and says so."""
    model = toy.hf_model("mpt")
    gm = qpass.capture(model)
    assert "at most 63 tokens" in gm.meta["qpass_capture"]["seq_note"]
    for shape in [(3, 11), (1, 1), (2, 7), (1, 63)]:
        ids = toy.token_ids(*shape)
        with torch.no_grad():
            assert (gm(ids).logits - model(ids).logits).abs().max() <= 1e-5
    with pytest.raises(Exception, match="63"):
        gm(toy.token_ids(1, 64))


def test_mpt_quantizes():
    model = toy.hf_model("mpt")
    qm = qpass.apply(model, {"version": 1, "passes": [{"quantize": {
        "weights": {"bits": 8, "granularity": "per_channel"},
        "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}]},
        progress=False)
    paths = {s.path for s in linear_sites(qm.graph_module)}
    assert {"transformer.blocks.0.attn.Wqkv", "transformer.blocks.1.ffn.down_proj", "lm_head"} <= paths
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        ref, out = model(ids).logits, qm(ids).logits
    assert 0 < (out - ref).abs().max() < 0.1


class FixedLength(nn.Module):
    """An HF-like causal LM whose code only works at one sequence length (a reshape to a constant)."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"vocab_size": 96, "max_position_embeddings": 64})()
        self.emb = nn.Embedding(96, 8)
        self.head = nn.Linear(8 * 8, 96)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=False):
        return self.head(self.emb(input_ids).reshape(input_ids.shape[0], 64))


def test_a_model_that_fixes_the_sequence_length_gets_a_capture_error_with_the_reason():
    with pytest.raises(qpass.CaptureError) as e:
        qpass.capture(FixedLength())
    msg = str(e.value)
    assert "FixedLength" in msg and "dynamic sequence length" in msg and "guard" in msg
    assert "Dim('seq'" in msg and "constant (8)" in msg and "seq = 8" in msg


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_decode_capture_matches_the_full_forward(family):
    """OPT derives positions from the cache length in Python (a data-dependent slice under export): the decode
    capture retries with explicit positions; Llama keeps transformers' own wrapper. Prefill then token-by-token
    decode gives the full forward's logits."""
    model = toy.hf_model(family)
    gm = qpass.capture_decode(model, max_cache_len=32)
    assert gm.meta[META_CAPTURE]["explicit_positions"] is (family == "opt")
    ids = toy.token_ids(1, 10)
    with torch.no_grad():
        ref = model(ids).logits
        steps = [gm(input_ids=ids[:, :6], cache_position=torch.arange(6))]
        steps += [gm(input_ids=ids[:, t:t + 1], cache_position=torch.tensor([t])) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-5)
