"""The lora pass: adapters beside linears, function unchanged at step 0, trained alone by qat (trainable: lora)."""
import pytest
import torch

import qpass
from qpass.graph import META_ORIGIN, linear_sites, op_counts
from qpass.passes.lora import META_LORA, adapter_parameters
from qpass.qat.packed_base import PackedBase
from qpass.quantizer import quantizers
from tests import toy

W4 = {"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16}, "ignore": ["lm_head"]}}
W4A8 = {"quantize": {"weights": {"bits": 4, "granularity": "per_channel"},
                     "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}


@pytest.fixture(scope="module")
def model():
    return toy.hf_model("llama")


def test_lora_fires_on_every_selected_linear_and_leaves_the_function_unchanged(model):
    base = qpass.apply(model, {"passes": [W4]}, progress=False)
    qm = qpass.apply(model, {"passes": [W4, {"lora": {"rank": 4}}]}, progress=False)
    n = len([s for s in linear_sites(base.graph_module) if s.path != "lm_head"])
    stats = qm.report["lora"].stats
    assert stats["adapters"] == n and stats["rank"] == 4
    gm = qm.graph_module
    assert len(gm.meta[META_LORA]) == n
    lora_nodes = [x for x in gm.graph.nodes if x.meta.get(META_ORIGIN) == "lora"]
    assert sum(x.target is torch.ops.aten.linear.default for x in lora_nodes) == 2 * n
    assert len(linear_sites(gm)) == len(linear_sites(base.graph_module))     # adapters are not linear sites
    ids = toy.token_ids(2, 9, seed=4)
    assert torch.equal(qm(ids).logits, base(ids).logits)                      # B = 0: unchanged at step 0
    a, b = adapter_parameters(gm)[:2]
    assert a.shape[0] == 4 and b.shape[1] == 4 and torch.count_nonzero(b) == 0 and a.abs().sum() > 0


def test_adapters_read_the_float_input_and_a_later_quantize_pass_leaves_them_alone(model):
    qm = qpass.apply(model, {"passes": [W4A8, {"lora": {"rank": 2, "targets": ["*q_proj"]}}]}, progress=False)
    gm = qm.graph_module
    for x in gm.graph.nodes:
        if x.meta.get(META_ORIGIN) == "lora" and x.target is torch.ops.aten.linear.default and \
                x.args[0].meta.get(META_ORIGIN) != "lora":
            assert not quantizers(gm) or x.args[0] not in {q.node for q in quantizers(gm)}
    first = qpass.apply(model, {"passes": [{"lora": {"rank": 2}}, W4]}, progress=False)
    assert all("lora" not in q.path for q in quantizers(first.graph_module))
    assert len(quantizers(first.graph_module)) == len(quantizers(qpass.apply(model, {"passes": [W4]}).graph_module))


def test_trainable_lora_trains_only_the_adapters_and_save_load_is_exact(model, tmp_path):
    qat = {"qat": {"samples": 12, "seq_len": 16, "steps": 4, "batch_size": 4, "lr": 5e-3, "cache_dir": None,
                   "trainable": "lora", "held_out": 0}}
    qm = qpass.apply(model, {"passes": [W4, {"lora": {"rank": 4}}, qat]}, progress=False)
    gm = qm.graph_module
    start = qpass.apply(model, {"passes": [W4, {"lora": {"rank": 4}}]}, progress=False).graph_module
    for p in start.parameters():
        p.requires_grad_(False)
    with PackedBase(start, []):     # the frozen base was held as codes: it ends as its on-grid (decoded) values
        pass
    trained = {n for n, _ in gm.named_parameters()
               if not torch.equal(gm.get_parameter(n), start.get_parameter(n))}
    names = {x for a, b, _ in gm.meta[META_LORA].values() for x in (a, b)}
    assert trained and trained <= names
    assert qm.report["qat"].stats["base"] == "packed"
    assert qm.report["qat"].stats["trainable_tensors"] == len(names)
    qm.save(tmp_path / "m")
    ids = toy.token_ids(2, 9, seed=4)
    loaded = qpass.load(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, qm(ids).logits)
    assert loaded.graph_module.meta[META_LORA] == gm.meta[META_LORA]


def test_a_lora_model_lowers_to_the_torch_backend_with_parity(model):
    qm = qpass.apply(model, {"passes": [W4, {"lora": {"rank": 4, "seed": 1}}]}, progress=False)
    with torch.no_grad():   # make the adapters do something
        for p in adapter_parameters(qm.graph_module):
            p.add_(0.01 * torch.randn_like(p))
    ids = toy.token_ids(2, 9, seed=4)
    packed = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(packed(ids).logits, qm(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_nothing_selected_and_errors(model):
    gm = qpass.capture(toy.hf_model("llama"))
    before = op_counts(gm)
    qm = qpass.apply(gm, {"passes": [{"lora": {"targets": ["*q_proj"], "ignore": ["*q_proj"]}}]}, progress=False)
    assert op_counts(qm.graph_module) == before and qm.report["lora"].stats["adapters"] == 0
    with pytest.raises(qpass.RecipeError, match=r"lora\.dropout"):
        qpass.Recipe.from_dict({"passes": [{"lora": {"dropout": 0.1}}]})
    with pytest.raises(qpass.RecipeError, match=r"lora\.rank"):
        qpass.Recipe.from_dict({"passes": [{"lora": {"rank": 0}}]})
    with pytest.raises(qpass.TargetNotFoundError):
        qpass.apply(model, {"passes": [{"lora": {"targets": ["*nope_proj"]}}]}, progress=False)
    with pytest.raises(qpass.RecipeError, match="already has an adapter"):
        qpass.apply(model, {"passes": [{"lora": {}}, {"lora": {}}]}, progress=False)
    with pytest.raises(qpass.CalibrationError, match="lora pass before qat"):
        qpass.apply(model, {"passes": [W4, {"qat": {"samples": 4, "seq_len": 8, "steps": 1, "batch_size": 2,
                                                    "cache_dir": None, "trainable": "lora"}}]}, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_saved_in_the_peft_layout_load_with_peft_onto_the_float_model(family, tmp_path):
    peft = pytest.importorskip("peft")
    import json

    from qpass.adapters import save_peft

    model = toy.hf_model(family)
    qm = qpass.apply(model, {"passes": [{"lora": {"rank": 4, "alpha": 8}}]}, progress=False)   # float base
    with torch.no_grad():
        for p in adapter_parameters(qm.graph_module):
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    save_peft(qm, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"] == (family == "gpt2")
    loaded = peft.PeftModel.from_pretrained(toy.hf_model(family), str(tmp_path / "adapter")).eval()
    ids = toy.token_ids(2, 9, seed=4)
    with torch.no_grad():
        ref = loaded(input_ids=ids).logits
        assert not torch.allclose(ref, model(input_ids=ids).logits, atol=1e-4)     # the adapters act
    torch.testing.assert_close(qm(ids).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(qpass.ArtifactError, match="no LoRA adapters"):
        save_peft(qpass.apply(model, {"passes": []}), tmp_path / "none")
    assert not (tmp_path / "none").exists()


def _trained(model, passes):
    qm = qpass.apply(model, {"passes": passes}, progress=False)
    with torch.no_grad():
        for p in adapter_parameters(qm.graph_module):
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    return qm


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_folds_the_adapters_into_a_float_base_exactly(family):
    model = toy.hf_model(family)
    qm = _trained(model, [{"lora": {"rank": 4}}])
    merged = qpass.apply(qm, {"passes": [{"lora_merge": {}}]}, progress=False)
    gm = merged.graph_module
    assert not any(x.meta.get(META_ORIGIN) == "lora" for x in gm.graph.nodes) and not gm.meta[META_LORA]
    assert not [n for n, _ in gm.named_parameters() if "lora" in n]
    ids = toy.token_ids(2, 9, seed=4)
    torch.testing.assert_close(merged(ids).logits, qm(ids).logits, atol=1e-5, rtol=1e-5)
    assert merged.report["lora_merge"].stats["merged"] == len(qm.graph_module.meta[META_LORA])


def test_merge_requantizes_a_quantized_base_and_lowers_to_both_backends(model, tmp_path):
    qm = _trained(model, [W4, {"lora": {"rank": 4}}])
    merged = qpass.apply(qm, {"passes": [{"lora_merge": {}}]}, progress=False)
    assert merged.report["lora_merge"].stats["requantized"] == merged.report["lora_merge"].stats["merged"] > 0
    ids = toy.token_ids(2, 9, seed=4)
    merged.save(tmp_path / "m")
    assert torch.equal(qpass.load(tmp_path / "m")(ids).logits, merged(ids).logits)
    # the merged weights are exactly representable by the new scales: lowering is exact up to float order
    packed = qpass.lower(merged, "torch", kernels="exact")
    torch.testing.assert_close(packed(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    art = qpass.lower(merged, "onnx", tmp_path / "onnx", fused_accuracy_level=0)   # exact MatMulNBits
    torch.testing.assert_close(onnx_qdq.logits(art.path, ids), merged(ids).logits, atol=1e-3, rtol=1e-3)
