"""Saved directories are sealed (every file loading reads is digested in qpass.json; a mismatch or a damaged
file is an ArtifactError naming the file) and deterministic (same recipe, data and seed: same bytes)."""
import filecmp
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import qpass
from qpass import IntFormat, PerGroup, QSpec, Recipe, artifacts
from qpass.passes import GptqConfig, QuantizeConfig
from tests import toy

CALIB = [toy.token_ids(batch=1, t=9, seed=s) for s in range(3)]
STREAM = Recipe([QuantizeConfig(weights=QSpec(IntFormat(4), PerGroup(16)), ignore=("lm_head",)), GptqConfig()])


def quantized(family: str = "llama_tied") -> qpass.QuantizedModel:
    """W8A8 with static scales: calibration data decides tensors; tied embeddings exercise safetensors' renames."""
    return qpass.apply(toy.hf_model(family), "recipes/w8a8_static.yaml", calib_data=CALIB, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, directory) of one single-file artefact; tests damage copies of it."""
    qm = quantized()
    path = tmp_path_factory.mktemp("saved") / "m"
    qm.save(path)
    return qm, str(path)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(source HF dir, directory) of one apply_from_disk artefact (several shards and an index)."""
    src = tmp_path_factory.mktemp("src")
    toy.hf_model("llama").save_pretrained(src, max_shard_size="20KB")
    out = tmp_path_factory.mktemp("streamed") / "m"
    qpass.apply_from_disk(src, STREAM, out, calib_data=CALIB, progress=False)
    return str(src), str(out)


def copy_of(directory: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(directory, dst)
    return dst


def same_bytes(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return names == sorted(os.listdir(b)) and not mismatch and not errors


def reseal(directory: str) -> None:
    """Record the current files in qpass.json as if they had been saved so: what is left is the check behind
    the digests (a writer bug, or a file from another run copied in with its qpass.json rewritten)."""
    path = os.path.join(directory, "qpass.json")
    meta = json.load(open(path))
    meta["files"] = {n: artifacts.file_digest(os.path.join(directory, n)) for n in meta["files"]}
    meta["seal"] = artifacts.seal(meta)
    json.dump(meta, open(path, "w"))


def edit(directory: str, name: str, change) -> None:
    path = os.path.join(directory, name)
    data = open(path, "rb").read()
    open(path, "wb").write(change(data))


def edit_json(directory: str, name: str, change) -> None:
    path = os.path.join(directory, name)
    obj = json.load(open(path))
    change(obj)
    json.dump(obj, open(path, "w"))


def rewrite_tensor(directory: str, change) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    key = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
    tensors[key] = change(tensors[key])
    safetensors.torch.save_file(tensors, path, metadata={"format": "qpass"})


# ------------------------------------------------------------------------------ sealed


def test_an_edited_recipe_is_refused_and_an_intact_copy_loads_exactly(saved, tmp_path):
    qm, src = saved
    ids = toy.token_ids(batch=2, t=10, seed=9)
    assert torch.equal(qpass.load(src)(ids).logits, qm(ids).logits)
    path = copy_of(src, tmp_path)
    edit(path, "recipe.yaml", lambda b: b.replace(b"bits: 8", b"bits: 4", 1))
    with pytest.raises(qpass.ArtifactError, match=r"recipe\.yaml' was changed after saving(.|\n)*fix: "):
        qpass.load(path)


DAMAGE = {   # name: (file changed, change, message)
    "recipe edited": ("recipe.yaml", lambda b: b.replace(b"symmetric: true", b"symmetric: false", 1),
                      r"recipe\.yaml' was changed after saving"),
    "qpass.json garbage": ("qpass.json", lambda b: b"\x89garbage{", r"qpass\.json' is not readable JSON"),
    "qpass.json a list": ("qpass.json", lambda b: b"[1, 2]", r"qpass\.json' is not a JSON object"),
    "qpass.json truncated": ("qpass.json", lambda b: b[: len(b) // 2], r"qpass\.json' is not readable JSON"),
    "qpass.json no files": ("qpass.json", lambda b: _json_without(b, "files"), r"qpass\.json' lacks .*'files'"),
    "qpass.json source edited": ("qpass.json", lambda b: b.replace(b'"float32"', b'"bfloat16"'),
                                 r"qpass\.json' was edited after saving: its seal"),
    "qpass.json format 1": ("qpass.json", lambda b: b.replace(b'"format": 3', b'"format": 1', 1),
                            r"artefact format 1 (.|\n)*quantize the model again"),
    "qpass.json format 99": ("qpass.json", lambda b: b.replace(b'"format": 3', b'"format": 99', 1),
                             r"qpass\.json' has artefact format 99"),
    "safetensors truncated": ("model.safetensors", lambda b: b[: len(b) - 100],
                              r"model\.safetensors' was changed after saving: it is \d+ bytes, saved as \d+ \(cut"),
    "safetensors bit flip": ("model.safetensors", lambda b: b[:-7] + bytes([b[-7] ^ 1]) + b[-6:],
                             r"model\.safetensors' was changed after saving"),
    "config model_type": ("config.json", lambda b: b.replace(b'"llama"', b'"nope"'),
                          r"config\.json' was changed after saving"),
    "config deleted": ("config.json", None, r"config\.json' is missing \(qpass.json lists it\)"),
}


def _json_without(raw: bytes, key: str) -> bytes:
    obj = json.loads(raw)
    del obj[key]
    return json.dumps(obj).encode()


@pytest.mark.parametrize("case", DAMAGE)
def test_each_damaged_file_is_an_artifact_error_naming_it(saved, tmp_path, case):
    name, change, message = DAMAGE[case]
    path = copy_of(saved[1], tmp_path)
    if change is None:
        os.remove(os.path.join(path, name))
    else:
        edit(path, name, change)
    with pytest.raises(qpass.ArtifactError, match=message) as err:
        qpass.load(path)
    assert "fix: " in str(err.value)


RESEALED = {   # damage behind matching digests: the checks after them
    "truncated safetensors": (lambda d: edit(d, "model.safetensors", lambda b: b[: len(b) // 2]),
                              r"model\.safetensors' is not a readable safetensors file"),
    "wrong tensor shape": (lambda d: rewrite_tensor(d, lambda t: t[:-1]),
                           r"model\.safetensors': .*q_proj\.weight is float32\[31, 32\]; the graph .* expects "
                           r"float32\[32, 32\]"),
    "wrong tensor dtype": (lambda d: rewrite_tensor(d, lambda t: t.double()),
                           r"model\.safetensors': .*q_proj\.weight is float64\[32, 32\]"),
    "unknown model_type": (lambda d: edit_json(d, "config.json", lambda c: c.update(model_type="nope")),
                           r"config\.json: transformers .* cannot build a causal LM .*'nope'"),
    "config garbage": (lambda d: edit(d, "config.json", lambda b: b"{not json"), r"config\.json' is not readable JSON"),
    "recipe invalid": (lambda d: edit(d, "recipe.yaml", lambda b: b.replace(b"bits: 8", b"bits: 99", 1)),
                       r"recipe\.yaml' does not load with qpass"),
}


@pytest.mark.parametrize("case", RESEALED)
def test_damage_behind_matching_digests_is_an_artifact_error_naming_the_file(saved, tmp_path, case):
    damage, message = RESEALED[case]
    path = copy_of(saved[1], tmp_path)
    damage(path)
    reseal(path)
    with pytest.raises(qpass.ArtifactError, match=message):
        qpass.load(path)


def test_sharded_artefacts_are_sealed_shard_by_shard(sharded, tmp_path):
    _, src = sharded
    meta = json.load(open(os.path.join(src, "qpass.json")))
    shards = sorted(f for f in os.listdir(src) if f.startswith("model-0"))
    assert len(shards) > 2 and set(meta["files"]) == {"config.json", "recipe.yaml", "plans.json",
                                                      "model.safetensors.index.json", *shards}
    path = copy_of(src, tmp_path)
    edit(path, shards[1], lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    with pytest.raises(qpass.ArtifactError, match=rf"{shards[1]}' was changed after saving"):
        qpass.load(path)
    os.remove(os.path.join(path, shards[1]))
    with pytest.raises(qpass.ArtifactError, match=rf"{shards[1]}' is missing"):
        qpass.load(path)


@pytest.mark.parametrize("index,message", [(b"{garbage", "is not readable JSON"),
                                           (b'{"metadata": {}}', "has no weight_map"),
                                           (b'{"weight_map": {"a": "model-9.safetensors"}}',
                                            "names shards that qpass.json does not list")])
def test_a_bad_index_is_an_artifact_error_naming_it(sharded, tmp_path, index, message):
    path = copy_of(sharded[1], tmp_path)
    edit(path, "model.safetensors.index.json", lambda b: index)
    with pytest.raises(qpass.ArtifactError, match=r"index\.json' was changed after saving"):
        qpass.load(path)
    reseal(path)
    with pytest.raises(qpass.ArtifactError, match=rf"index\.json' {message}"):
        qpass.load(path)


# ------------------------------------------------------------------------------ deterministic


def test_same_recipe_data_and_seed_give_byte_identical_files(saved, tmp_path):
    qm, first = saved
    quantized().save(tmp_path / "again")          # apply + save again
    qm.save(tmp_path / "resaved")                 # the same model saved again
    assert same_bytes(first, str(tmp_path / "again")) and same_bytes(first, str(tmp_path / "resaved"))
    meta = json.load(open(os.path.join(first, "qpass.json")))
    assert meta["report"] and all("seconds" not in row for row in meta["report"])   # timings stay in memory


def test_streamed_artefacts_are_byte_identical_and_load_exactly(sharded, tmp_path):
    src, first = sharded
    moved = shutil.copytree(src, tmp_path / "elsewhere")          # where the model is read from is not saved
    qpass.apply_from_disk(moved, STREAM, tmp_path / "again", calib_data=CALIB, progress=False)
    assert same_bytes(first, str(tmp_path / "again"))
    ref = qpass.apply(toy.captured("llama")[1], STREAM, calib_data=CALIB, progress=False)
    ids = toy.token_ids(batch=2, t=10, seed=9)
    assert torch.equal(qpass.load(first)(ids).logits, ref(ids).logits)


def test_safetensors_headers_are_canonical(tmp_path):
    """safetensors writes its metadata map in hash order, different from call to call."""
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.int8)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.safetensors")
        artifacts.write_safetensors(dict(reversed(tensors.items())) if i % 2 else tensors, str(files[-1]), metadata)
    assert len({f.read_bytes() for f in files}) == 1
    loaded = safetensors.torch.load_file(files[0])
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
