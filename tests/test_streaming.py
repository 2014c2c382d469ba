"""Streaming mode (qpass.apply_from_disk): same numbers as qpass.apply, one segment's weights in memory."""
import copy
import os

import pytest
import safetensors.torch
import torch
import transformers

import qpass
from qpass import IntFormat, PerGroup, QSpec, Recipe
from qpass.streaming import OnDisk, WeightStore, load_shards, skeleton_parameters
from qpass.passes import AwqConfig, GptqConfig, KvCacheConfig, QatConfig, QuantizeConfig
from qpass.primitives.spec import PerChannel
from qpass.block_sweep import segment_attrs
from tests import toy

W4 = QSpec(IntFormat(4), PerGroup(16))
RTN = QuantizeConfig(weights=W4, ignore=("lm_head",))
RECIPES = {"rtn": Recipe([RTN]), "gptq": Recipe([RTN, GptqConfig()]), "awq": Recipe([AwqConfig(), RTN]),
           "awq_gptq": Recipe([AwqConfig(), RTN, GptqConfig()]),
           "smoothquant_static": "recipes/w8a8_static_smoothquant.yaml",   # observe_by_block, per-group loads
           "kv_static": Recipe([RTN, KvCacheConfig(keys=QSpec(IntFormat(8), PerChannel(-1)), values=None)])}
CALIB = [toy.token_ids(batch=1, t=9, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{family: (model, directory)}: tiny random models saved in several safetensors shards."""
    out = {}
    for family in ("llama", "opt"):
        path = tmp_path_factory.mktemp(family)
        model = toy.hf_model(family)
        model.save_pretrained(path, max_shard_size="20KB")
        out[family] = (model, str(path))
    return out


@pytest.fixture(scope="module")
def streamed(sources, tmp_path_factory):
    """streamed(family, recipe) -> StreamResult, each run once per module."""
    runs = {}

    def run(family: str, recipe: str) -> qpass.StreamResult:
        if (family, recipe) not in runs:
            out = tmp_path_factory.mktemp("out") / f"{family}-{recipe}"
            runs[family, recipe] = qpass.apply_from_disk(sources[family][1], RECIPES[recipe], out, calib_data=CALIB,
                                                         progress=False)
        return runs[family, recipe]
    return run


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family,recipe,rebuild", [("llama", "rtn", False), ("llama", "gptq", True),
                                                   ("llama", "awq", False), ("opt", "awq_gptq", True),
                                                   ("opt", "smoothquant_static", False),
                                                   ("llama", "kv_static", False)])
def test_streaming_equals_in_memory_bit_for_bit(sources, streamed, family, recipe, rebuild):
    src = sources[family][1]
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 2
    res = streamed(family, recipe)
    ref = qpass.apply(toy.captured(family)[1], RECIPES[recipe], calib_data=CALIB, progress=False)
    files = sorted(os.listdir(res.directory))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 2
    if rebuild:    # qpass.load: from config.json, recipe replayed, shards loaded
        back = qpass.load(res.directory)
    else:          # the shards alone, into a copy of the in-memory result (no second capture)
        back = copy.deepcopy(ref)
        with torch.no_grad():
            for p in back.graph_module.parameters():
                p.zero_()
        load_shards(back.graph_module, res.directory)
    assert state_equal(back.graph_module.state_dict(), ref.graph_module.state_dict())
    ids = toy.token_ids(batch=2, t=10, seed=9)
    assert torch.equal(back(ids).logits, ref(ids).logits)
    assert [r.name for r in res.report] == [r.name for r in ref.report]
    for r, m in zip(res.report, ref.report):
        assert r.stats == m.stats, r.name


def test_one_segment_of_weights_is_in_memory_at_a_time(streamed):
    res = streamed("llama", "gptq")
    gm = toy.captured("llama")[1]
    params = dict(gm.named_parameters())
    segments = [[a for a in attrs if a in params] for attrs in segment_attrs(gm)]
    seg_bytes = [sum(params[a].numel() * params[a].element_size() for a in attrs) for attrs in segments]
    total = sum(p.numel() * p.element_size() for p in params.values())
    assert res.param_bytes == total
    # the peak is exactly the largest segment (a decoder block here) and everything then loaded is in it
    assert res.peak_bytes == max(seg_bytes) < 0.5 * total
    assert any(set(res.peak_names) <= set(attrs) for attrs in segments)
    assert "model.model.layers.0.self_attn.q_proj.weight" in res.peak_names


def test_skeleton_has_meta_parameters_and_real_buffers():
    with skeleton_parameters():
        model = transformers.AutoModelForCausalLM.from_config(toy.hf_config("llama_tied"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight                 # ties survive
    ref = toy.hf_model("llama_tied")
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert torch.nn.Linear(3, 4).weight.device.type == "cpu"                      # the patch is undone


def test_store_loads_writes_back_changes_and_puts_stand_ins_back(tmp_path):
    m, x = toy.TinyMLP(), toy.mlp_input()
    gm = qpass.capture(m, (x,))
    state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    store = WeightStore(gm, {k: (str(tmp_path / "w.safetensors"), k) for k in state}, str(tmp_path / "scratch"))
    assert isinstance(gm.fc1.weight, OnDisk) and store.nbytes == sum(v.numel() * 4 for v in state.values())
    with pytest.raises(qpass.RecipeError, match="fc1.weight is on disk"):
        gm(x)
    with store.loaded(["fc1.weight", "fc2.weight"]):
        with store.loaded(["fc1.weight", "fc1.bias"]):     # nested: shared, read once
            assert torch.equal(gm.fc1.weight, state["fc1.weight"])
            with torch.no_grad():
                gm.fc1.weight.mul_(2)
        assert not isinstance(gm.fc1.weight, OnDisk) and isinstance(gm.fc1.bias, OnDisk)
    assert isinstance(gm.fc1.weight, OnDisk) and store.stats.resident_bytes == 0
    assert store.stats.writes == 1 and store.stats.loads == 3                   # only the changed tensor
    with store.loaded(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]):
        assert torch.equal(gm.fc1.weight, 2 * state["fc1.weight"])
        assert torch.equal(gm.fc2.weight, state["fc2.weight"])
        torch.testing.assert_close(gm(x), m.fc2(torch.relu(x @ (2 * m.fc1.weight).T + m.fc1.bias)))
    assert store.stats.peak_bytes == store.nbytes
    assert safetensors.torch.load_file(tmp_path / "w.safetensors")["fc1.weight"].equal(state["fc1.weight"])


def test_refused_recipes_fail_before_anything_runs(sources, tmp_path):
    _, src = sources["llama"]
    qat = Recipe([RTN, QatConfig(steps=1, samples=1, seq_len=4, batch_size=1, greedy_lengths=(1,))])
    with pytest.raises(qpass.RecipeError, match=r"(?s)passes\[1\]\.qat: qat trains every parameter.*qpass.apply"):
        qpass.apply_from_disk(src, qat, tmp_path / "out", calib_data=CALIB)
    with pytest.raises(qpass.RecipeError, match=r"passes\[1\]\.gptq: sequential: false"):
        qpass.apply_from_disk(src, Recipe([RTN, GptqConfig(sequential=False)]), tmp_path / "out", calib_data=CALIB)
    with pytest.raises(qpass.RecipeError, match="verify"):
        qpass.apply_from_disk(src, Recipe([RTN], verify=True), tmp_path / "out", calib_data=CALIB)
    assert os.listdir(tmp_path) == []


def test_model_directory_errors(sources, tmp_path):
    model, src = sources["llama"]
    model.config.save_pretrained(tmp_path / "nocheckpoint")
    with pytest.raises(qpass.ArtifactError, match="has no model.safetensors or model.safetensors.index.json"):
        qpass.apply_from_disk(tmp_path / "nocheckpoint", RECIPES["rtn"], tmp_path / "out")
    toy.hf_model("opt").config.save_pretrained(tmp_path / "other")          # OPT config, Llama weights
    for f in os.listdir(src):
        if f.startswith("model"):
            os.link(os.path.join(src, f), tmp_path / "other" / f)
    with pytest.raises(qpass.ArtifactError, match="no tensor for .* parameters"):
        qpass.apply_from_disk(tmp_path / "other", RECIPES["rtn"], tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(qpass.ArtifactError, match="not empty"):
        qpass.apply_from_disk(src, RECIPES["rtn"], tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["x"] and not os.path.exists(tmp_path / "out")


def test_failure_mid_run_leaves_no_output(sources, tmp_path, monkeypatch):
    _, src = sources["llama"]
    from qpass.passes import gptq as gmod

    calls = []

    def fails_on_the_second_block(self, gm, site, acc):
        calls.append(site.path)
        if site.path.startswith("model.layers.1"):
            raise RuntimeError("disk full")
        return orig(self, gm, site, acc)

    orig = gmod.Gptq._requantize
    monkeypatch.setattr(gmod.Gptq, "_requantize", fails_on_the_second_block)
    with pytest.raises(qpass.PassError, match="gptq failed after \\['quantize'\\]: RuntimeError: disk full"):
        qpass.apply_from_disk(src, RECIPES["gptq"], tmp_path / "out", calib_data=CALIB, progress=False)
    assert calls and os.listdir(tmp_path) == []     # neither out nor a .qpass-save-* temporary
