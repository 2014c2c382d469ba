"""qpass.hf: one way to pass and read an eager HF model's KV cache on every supported transformers 5.x
(``past_key_values`` up to 5.24, ``cache`` from 5.25), without the FutureWarning of the old name."""
from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache

from qpass.qat.datagen import hf_step
from qpass.hf import cache_kwargs, output_cache
from tests import toy


def test_cache_round_trip_without_warnings_and_equal_to_a_full_pass():
    model = toy.hf_model("llama")
    ids = toy.token_ids(1, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            first = model(input_ids=ids[:, :5], **cache_kwargs(model, cache), use_cache=True)
            assert output_cache(first) is cache and cache.get_seq_length() == 5
            second = model(input_ids=ids[:, 5:], **cache_kwargs(model, cache), use_cache=True)
            assert cache.get_seq_length() == 7
            full = model(input_ids=ids).logits
    torch.testing.assert_close(second.logits, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_the_data_generation_step_warns_nothing():
    model = toy.hf_model("llama")
    step = hf_step(model)
    ids = toy.token_ids(1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            a = step(ids[:, :3], torch.arange(3))
            b = step(ids[:, 3:], torch.tensor([3]))
    assert a.shape[1] == 3 and b.shape[1] == 1
