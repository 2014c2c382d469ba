"""QpassORTModelForCausalLM: optimum's ORTModelForCausalLM interface over a lowered directory, in this environment
(transformers 5), with transformers' own generate()."""
import pathlib

import pytest
import torch

from tests import toy

pytest.importorskip("onnxruntime")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _lower(family, recipe, out, **options):
    import qpass

    model = toy.hf_model(family)
    qm = qpass.apply(model, ROOT / "recipes" / recipe, progress=False)
    qpass.lower(qm, "onnx", out, **options)
    return model, qm, out


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """Toy Llama, W4A16 g128 (MatMulNBits at accuracy level 0: the fake-quant model's numbers)."""
    return _lower("llama", "w4a16_g128.yaml", tmp_path_factory.mktemp("ort") / "w4", fused_accuracy_level=0)


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    """Toy Mistral (sliding window 16), no quantization: the ONNX decoder computes the HF model's logits."""
    return _lower("mistral", "w16.yaml", tmp_path_factory.mktemp("ort") / "fp")


def load(out, **kw):
    from qpass.backends.onnx_qdq import QpassORTModelForCausalLM

    return QpassORTModelForCausalLM.from_pretrained(out, **kw)


def test_greedy_generate_equals_fake_quant_and_the_onnx_runtime_loop(w4):
    from qpass.backends import onnx_qdq

    _, qm, out = w4
    model = load(out)
    ids = toy.token_ids(2, 9)
    with torch.no_grad():
        greedy = ids
        for _ in range(8):                     # greedy without a cache, on the fake-quant graph
            greedy = torch.cat([greedy, qm(greedy).logits[:, -1:].argmax(-1)], 1)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, greedy)
    assert torch.equal(onnx_qdq.generate(out, ids, 8), greedy)


def test_generate_matches_transformers_on_the_float_model_beyond_the_sliding_window(fp):
    """Greedy, beam search and a left-padded batch: the same tokens as the HF model's own generate(), for 30
    tokens with a sliding window of 16 (the cache keeps every position; the graph's mask applies the window)."""
    hf, _, out = fp
    model = load(out)
    ids = toy.token_ids(1, 9)
    for kw in ({}, {"num_beams": 2}):
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, **kw)
        assert torch.equal(model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, **kw), ref)
    batch = toy.token_ids(2, 7, seed=5)
    batch[0, :3] = 0
    mask = torch.ones_like(batch)
    mask[0, :3] = 0                                                      # row 0 is left-padded
    with torch.no_grad():
        ref = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    alone = model.generate(batch[:1, 3:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:1, 3:], alone)                               # padding changes nothing


def test_sampling_runs_and_is_seeded(w4):
    model = load(w4[2])
    ids = toy.token_ids(1, 5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8))
    assert runs[0].shape == (1, 11) and torch.equal(runs[0], runs[1])


def test_forward_with_a_cache_equals_one_pass_over_the_whole_sequence(w4):
    model = load(w4[2])
    ids = toy.token_ids(2, 9)
    full = model(ids).logits
    first = model(ids[:, :6])
    cache = first.cache if hasattr(first, "cache") and "cache" in first.keys() else first.past_key_values
    assert cache.get_seq_length() == 6
    step = model(ids[:, 6:], attention_mask=torch.ones(2, 9, dtype=torch.long), cache=cache)
    assert torch.allclose(torch.cat([first.logits, step.logits], 1), full, atol=1e-4)
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)   # optimum's tuple of (key, value)
    logits, past = model(ids[:, 6:], past_key_values=legacy, return_dict=False)
    assert torch.allclose(logits, step.logits) and isinstance(past, tuple) and past[0][0].shape[2] == 9
    assert model(ids, use_cache=False).to_tuple()[0].shape == (2, 9, 96)


def test_clear_errors(w4, tmp_path):
    import qpass

    out = w4[2]
    with pytest.raises(qpass.ArtifactError, match="does not exist"):
        load(tmp_path / "nothing")
    with pytest.raises(qpass.ArtifactError, match="export=True"):
        load(out, export=True)
    with pytest.raises(qpass.ArtifactError, match="use_io_binding"):
        load(out, use_io_binding=True)
    with pytest.raises(TypeError, match="revision"):
        load(out, revision="main")
    model = load(out)
    with pytest.raises(ValueError, match="attention_mask"):
        model(toy.token_ids(1, 4), attention_mask=torch.ones(1, 7, dtype=torch.long))


def test_a_damaged_or_edited_file_is_refused_by_name(w4, tmp_path):
    """qpass.json seals model.onnx, config.json and recipe.yaml (size + SHA-256) like a saved model's; loading
    checks them first. Entries outside the seal (qpass lower's parity figures, tokenizer files) may change."""
    import json
    import shutil

    import qpass
    from qpass.backends.onnx_qdq.lower import verify

    meta = verify(w4[2])
    assert {"model.onnx", "config.json", "recipe.yaml"} <= set(meta["files"]) and meta["seal"]

    def copy(name):
        out = tmp_path / name
        shutil.copytree(w4[2], out)
        return out

    out = copy("parity")                                     # what `qpass lower` adds after lowering
    meta_path = out / "qpass.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "parity": {"tokens": 4}}, indent=2))
    load(out)

    out = copy("byte")
    data = bytearray((out / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(qpass.ArtifactError, match=r"model\.onnx' was changed after lowering: its SHA-256"):
        load(out)

    out = copy("short")
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text() + "# edited\n")
    with pytest.raises(qpass.ArtifactError, match=r"recipe\.yaml' was changed after lowering: it is \d+ bytes"):
        load(out)

    out = copy("missing")
    (out / "config.json").unlink()
    with pytest.raises(qpass.ArtifactError, match=r"config\.json' is missing"):
        verify(out)

    out = copy("edited")                                    # a digest edited to match a replaced file
    meta = json.loads((out / "qpass.json").read_text())
    meta["files"]["model.onnx"]["bytes"] += 1
    (out / "qpass.json").write_text(json.dumps(meta))
    with pytest.raises(qpass.ArtifactError, match=r"qpass\.json' was edited after lowering"):
        load(out)

    out = copy("old")                                       # lowered before directories were sealed
    meta = json.loads((out / "qpass.json").read_text())
    del meta["files"], meta["seal"]
    (out / "qpass.json").write_text(json.dumps(meta))
    with pytest.raises(qpass.ArtifactError, match="records no digests"):
        load(out)

    out = copy("none")
    (out / "qpass.json").unlink()
    with pytest.raises(qpass.ArtifactError, match="has no qpass.json"):
        load(out)
