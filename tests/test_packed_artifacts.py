"""Lowered torch models (PackedModel.save / torch_packed.load) are sealed artefacts like qm.save's: digests and
a seal checked on load, every damaged file an ArtifactError naming it, byte-identical saves; the measured kernel
plan lives in kernels.json, outside the digests, and is reused only on a machine like the saving one."""
import json
import os

import pytest
import torch

import qpass
from qpass.backends import torch_packed as tp
from tests import toy
from tests.test_artifacts import copy_of, edit, reseal, same_bytes

RECIPE = "recipes/w4a8_kv4.yaml"                 # int4 weights, dynamic int8 inputs: no calibration data needed
FIXED = {1: "q4avx2", 8: "int4pack", 128: "dequant"}   # a policy that measures nothing (whichever applies)


def lowered(kernels=FIXED) -> tuple[qpass.QuantizedModel, tp.PackedModel]:
    qm = qpass.apply(toy.hf_model("llama"), RECIPE, progress=False)
    return qm, qpass.lower(qm, "torch", kernels=kernels, repeats=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(packed model, directory) of one lowered artefact; tests damage copies of it."""
    _, pm = lowered()
    path = tmp_path_factory.mktemp("packed") / "m"
    pm.save(path)
    return pm, str(path)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(packed model, directory) lowered with the 'exact' policy: the plan is measured, kernels.json holds it."""
    _, pm = lowered("exact")
    path = tmp_path_factory.mktemp("measured") / "m"
    pm.save(path)
    return pm, str(path)


IDS = toy.token_ids(2, 7)


# ------------------------------------------------------------------------------ sealed


def test_an_intact_copy_loads_bit_exactly_and_an_edited_recipe_is_refused(saved, tmp_path):
    pm, src = saved
    meta = json.load(open(os.path.join(src, "qpass.json")))
    assert meta["format"] == 3 and meta["backend"] == "torch" and meta["kernels"] == {"1": "q4avx2", "8": "int4pack",
                                                                                       "128": "dequant"}
    assert set(meta["files"]) == {"config.json", "model.safetensors", "plans.json", "recipe.yaml"} and meta["seal"]
    back = tp.load(src)
    assert torch.equal(back(IDS).logits, pm(IDS).logits) and back.plan() == pm.plan()
    path = copy_of(src, tmp_path)
    edit(path, "recipe.yaml", lambda b: b.replace(b"bits: 4", b"bits: 8", 1))
    with pytest.raises(qpass.ArtifactError, match=r"recipe\.yaml' was changed after saving(.|\n)*fix: "):
        tp.load(path)


DAMAGE = {   # name: (file changed, change, message)
    "recipe edited": ("recipe.yaml", lambda b: b.replace(b"symmetric: true", b"symmetric: false", 1),
                      r"recipe\.yaml' was changed after saving"),
    "safetensors truncated": ("model.safetensors", lambda b: b[: len(b) - 100],
                              r"model\.safetensors' was changed after saving: it is \d+ bytes"),
    "safetensors bit flip": ("model.safetensors", lambda b: b[:-7] + bytes([b[-7] ^ 1]) + b[-6:],
                             r"model\.safetensors' was changed after saving: its SHA-256"),
    "config edited": ("config.json", lambda b: b.replace(b'"llama"', b'"nope"'), r"config\.json' was changed"),
    "config deleted": ("config.json", None, r"config\.json' is missing \(qpass.json lists it\)"),
    "qpass.json garbage": ("qpass.json", lambda b: b"\x89garbage{", r"qpass\.json' is not readable JSON"),
    "qpass.json truncated": ("qpass.json", lambda b: b[: len(b) // 2], r"qpass\.json' is not readable JSON"),
    "qpass.json deleted": ("qpass.json", None, r"is not a qpass model directory \(missing \['qpass.json'\]\)"),
    "kernel policy edited": ("qpass.json", lambda b: b.replace(b'"int4pack"', b'"int8pack"', 1),
                             r"qpass\.json' was edited after saving: its seal"),
    "backend edited": ("qpass.json", lambda b: b.replace(b'"backend": "torch"', b'"backend": "onnx"', 1),
                       r"qpass\.json' was edited after saving: its seal"),
    "format 99": ("qpass.json", lambda b: b.replace(b'"format": 3', b'"format": 99', 1),
                  r"qpass\.json' has artefact format 99"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_each_damaged_file_is_an_artifact_error_naming_it(saved, tmp_path, case):
    name, change, message = DAMAGE[case]
    path = copy_of(saved[1], tmp_path)
    if change is None:
        os.remove(os.path.join(path, name))
    else:
        edit(path, name, change)
    with pytest.raises(qpass.ArtifactError, match=message) as err:
        tp.load(path)
    assert "fix: " in str(err.value)


def test_damage_behind_matching_digests_is_still_named(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    edit(path, "model.safetensors", lambda b: b[: len(b) // 2])
    reseal(path)
    with pytest.raises(qpass.ArtifactError, match=r"model\.safetensors' is not a readable safetensors file"):
        tp.load(path)


def test_the_old_format_and_the_wrong_loader_say_what_to_do(saved, tmp_path):
    path = copy_of(saved[1], tmp_path)
    meta = json.load(open(os.path.join(path, "qpass.json")))
    json.dump({**meta, "format": 1}, open(os.path.join(path, "qpass.json"), "w"))
    with pytest.raises(qpass.ArtifactError, match=r"lowered torch model in artefact format 1(.|\n)*fix: lower the "
                                                  r"quantized model again"):
        tp.load(path)
    with pytest.raises(qpass.ArtifactError, match=r"lowered to the torch backend(.|\n)*torch_packed\.load"):
        qpass.load(saved[1])


# ------------------------------------------------------------------------------ deterministic


def test_saving_twice_and_lowering_twice_give_byte_identical_files(saved, tmp_path):
    pm, first = saved
    pm.save(tmp_path / "resaved")
    lowered()[1].save(tmp_path / "again")
    assert same_bytes(first, str(tmp_path / "resaved")) and same_bytes(first, str(tmp_path / "again"))
    assert sorted(os.listdir(first)) == ["config.json", "model.safetensors", "plans.json", "qpass.json", "recipe.yaml"]


def test_a_measured_plan_is_kept_apart_and_reused_only_on_a_matching_machine(measured, tmp_path, monkeypatch):
    pm, first = measured
    tp.kernels._DECISIONS.clear()                                 # measure afresh: timings (maybe choices) differ
    lowered("exact")[1].save(tmp_path / "again")
    again = str(tmp_path / "again")
    sealed = ["config.json", "model.safetensors", "plans.json", "qpass.json", "recipe.yaml"]
    assert sorted(os.listdir(again)) == sorted([*sealed, "kernels.json"])
    assert all(open(os.path.join(first, n), "rb").read() == open(os.path.join(again, n), "rb").read() for n in sealed)
    tuning = json.load(open(os.path.join(first, "kernels.json")))
    assert tuning["machine"] == tp.machine() and tuning["kernels"] == "exact" and tuning["tuning"]
    assert "kernels.json" not in json.load(open(os.path.join(first, "qpass.json")))["files"]
    pm.save(tmp_path / "resaved")                                 # the same lowered model: every file the same
    assert same_bytes(first, str(tmp_path / "resaved"))

    monkeypatch.setattr(tp.model, "tune", lambda *a, **k: pytest.fail("measured again on the same machine"))
    back = tp.load(first)
    assert back.plan() == pm.plan() and torch.equal(back(IDS).logits, pm(IDS).logits)

    calls = []
    monkeypatch.setattr(tp.model, "tune", lambda mods, policy: calls.append(policy) or [])
    path = copy_of(first, tmp_path)
    tuning["machine"]["cpu"] = "another CPU"
    json.dump(tuning, open(os.path.join(path, "kernels.json"), "w"))
    tp.load(path)
    os.remove(os.path.join(path, "kernels.json"))                 # deleting it only means measuring again
    tp.load(path)
    assert calls == ["exact", "exact"]


@pytest.mark.parametrize("content,message", [(b"{garbage", r"kernels\.json' is not readable JSON"),
                                             (b"[]", r"kernels\.json' is not a kernel plan of this model"),
                                             (None, r"kernels\.json' is not a kernel plan of this model \(kernels "
                                                    r"that do not apply here: \[.*nope")])
def test_a_damaged_kernel_plan_is_named_with_a_fix(measured, tmp_path, content, message):
    path = copy_of(measured[1], tmp_path)
    if content is None:                                           # a plan naming a kernel that does not exist
        tuning = json.load(open(os.path.join(path, "kernels.json")))
        next(iter(tuning["plan"].values()))["1"] = "nope"
        content = json.dumps(tuning).encode()
    edit(path, "kernels.json", lambda b: content)
    with pytest.raises(qpass.ArtifactError, match=message + r"(.|\n)*fix: delete kernels\.json"):
        tp.load(path)
