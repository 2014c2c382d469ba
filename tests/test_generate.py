import pytest
import torch

import qpass
from qpass.generate import generate, next_token
from tests import toy


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unquantized_decode_graph_generates_like_hf(family):
    model = toy.hf_model(family)
    prompt = toy.token_ids(1, 6)
    out = qpass.apply(model, "recipes/w16.yaml").generate(prompt, 12)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("recipe", ["recipes/w4a16_g128.yaml", "recipes/w8a8_static.yaml"])
def test_cached_generation_equals_no_cache_greedy(recipe):
    qm = qpass.apply(toy.hf_model("llama"), recipe, calib_data=[toy.token_ids(seed=s) for s in range(2)],
                     progress=False)
    prompt = toy.token_ids(2, 5)
    out = qm.generate(prompt, 10)
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, qm(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_greedy_steps_come_first():
    vocab = 50
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def step(ids, pos):                       # a bigram "model": logits depend on the last token only
        return table[ids]

    prompt = torch.tensor([[3]])
    greedy = generate(step, prompt, 8)
    a = generate(step, prompt, 8, do_sample=True, greedy_steps=3, seed=1)
    b = generate(step, prompt, 8, do_sample=True, greedy_steps=3, seed=1)
    c = generate(step, prompt, 8, do_sample=True, greedy_steps=3, seed=2)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :4], greedy[:, :4])          # prompt + 3 greedy tokens
    assert not torch.equal(a, c)


def test_top_k_restricts_sampling():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, sample=True, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {1, 2}
    with pytest.raises(ValueError, match="temperature"):
        next_token(logits, sample=True, temperature=0.0, top_k=None, generator=None)
