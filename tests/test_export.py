"""qpass's own artefact is refused by transformers; compressed-tensors export (qpass.export) loads in
transformers on CPU with qpass's fake-quant numbers."""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import transformers

import qpass
from qpass.errors import UnsupportedOpError
from qpass.export import compressed_tensors, pack_int32

from . import toy

W4_G128 = {"version": 1, "passes": [{"quantize": {
    "weights": {"bits": 4, "granularity": "per_group", "group_size": 128, "symmetric": True}, "ignore": ["lm_head"]}}]}
W8A8 = {"version": 1, "passes": [{"quantize": {
    "weights": {"bits": 8, "granularity": "per_channel", "symmetric": True},
    "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}]}


def _w(**weights):
    return {"version": 1, "passes": [{"quantize": {"weights": weights, "ignore": ["lm_head"]}}]}


_MODEL = {}


def llama128():
    """A tiny Llama whose linears take 128 or 256 inputs (groups of 128 fit)."""
    if not _MODEL:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                       max_position_embeddings=64)
        _MODEL["m"] = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return _MODEL["m"]


def ct():
    return pytest.importorskip("compressed_tensors")


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def fake_quant_weights(qm) -> dict[str, torch.Tensor]:
    """{linear path: its fake-quantized weight}: each weight quantizer node run on its own (stored) arguments."""
    from qpass.quantizer import quantizers

    gm = qm.graph_module

    def value(a):
        if isinstance(a, torch.fx.Node):
            assert a.op == "get_attr", a
            return functools.reduce(getattr, a.target.split("."), gm)
        return a

    with torch.no_grad():
        return {q.path: q.node.target(*map(value, q.node.args)) for q in quantizers(gm, role="weight")}


# ------------------------------------------------------------------ qpass's own artefact is never a checkpoint


def test_transformers_refuses_a_qpass_directory(tmp_path):
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _w(bits=4, granularity="per_group", group_size=16))
    qm.save(tmp_path / "q")
    with pytest.raises(ValueError, match=r"qpass artefact: load it with qpass\.load"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qpass"
    x = toy.token_ids()
    back = qpass.load(tmp_path / "q")                  # qpass itself still reads it, as saved
    assert torch.equal(logits(back, x), logits(qm, x))
    assert "quantization_config" not in back.source["hf_config"]


def test_transformers_refuses_streamed_and_lowered_directories_too(tmp_path):
    toy.save_hf_dir(tmp_path / "hf", tokenizer=False)
    qpass.apply_from_disk(tmp_path / "hf", _w(bits=8, granularity="per_channel"), tmp_path / "disk", progress=False)
    pm = qpass.lower(qpass.apply(toy.hf_model("llama"), _w(bits=8, granularity="per_channel")), "torch",
                     kernels="reference")
    pm.save(tmp_path / "packed")
    for d in ("disk", "packed"):
        with pytest.raises(ValueError, match=r"qpass\.load"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d)


# ------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int32_matches_compressed_tensors(bits, dim):
    ct()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 71), generator=g, dtype=torch.int8)
    packed = pack_int32(codes, bits, dim)
    assert torch.equal(packed, pack_to_int32(codes, bits, packed_dim=dim))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(codes.shape), packed_dim=dim), codes)


# ------------------------------------------------------------------ round trips through transformers


def _export_and_load(qm, path):
    res = compressed_tensors(qm, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    logits(hf, toy.token_ids(1, 2))     # packed weights are decompressed on the first forward
    return res, hf


def _check_weights(qm, hf):
    """The dequantized weight transformers holds is qpass's fake-quant weight, bit for bit."""
    fq = fake_quant_weights(qm)
    assert fq
    for path, w in fq.items():
        assert torch.equal(hf.get_submodule(path).weight.detach(), w), path


def test_w4_g128_loads_in_transformers_with_the_fake_quant_logits(tmp_path):
    ct()
    model, x = llama128(), toy.token_ids()
    qm = qpass.apply(model, W4_G128)
    res, hf = _export_and_load(qm, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                          "dynamic": False, "strategy": "group", "group_size": 128}
    assert res.ignored == ["lm_head"] and len(res.quantized) == 14
    _check_weights(qm, hf)
    # weight-only: the same weights through the same float ops, so the logits agree to float rounding
    torch.testing.assert_close(logits(hf, x), logits(qm, x), rtol=0, atol=1e-5)
    assert (logits(qm, x) - logits(model, x)).abs().max() > 1e-2        # and it is not the float model
    size = os.path.getsize(tmp_path / "ct" / "model.safetensors")
    model.save_pretrained(tmp_path / "fp")
    assert size < 0.75 * os.path.getsize(tmp_path / "fp" / "model.safetensors")


@pytest.mark.parametrize("case", ["w8_channel", "w3_tensor", "fp8_w8a8"])
def test_other_weight_formats_round_trip(tmp_path, case):
    ct()
    model, x = llama128(), toy.token_ids()
    recipe = {"w8_channel": _w(bits=8, granularity="per_channel"),
              "w3_tensor": _w(bits=3, granularity="per_tensor"),
              "fp8_w8a8": {"version": 1, "passes": [{"quantize": {
                  "weights": {"format": "fp8_e4m3", "granularity": "per_channel"},
                  "activations": {"format": "fp8_e4m3", "granularity": "per_token", "dynamic": True},
                  "ignore": ["lm_head"]}}]}}[case]
    qm = qpass.apply(model, recipe)
    _, hf = _export_and_load(qm, tmp_path / "ct")
    if case == "fp8_w8a8":
        ref = qpass.apply(model, _w(format="fp8_e4m3", granularity="per_channel"))
        down = "model.layers.0.mlp.down_proj"
        assert torch.equal(hf.get_submodule(down).weight, fake_quant_weights(ref)[down])
        return
    _check_weights(qm, hf)
    torch.testing.assert_close(logits(hf, x), logits(qm, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("granularity", [{"granularity": "per_group", "group_size": 128},
                                         {"granularity": "per_channel"}])
def test_asymmetric_weights_are_what_compressed_tensors_writes(tmp_path, granularity):
    """Asymmetric int4: our tensors equal compressed-tensors' own compressor's output for the same weight, scale
    and zero point (zero points packed along the rows, as vLLM reads them). transformers 5.25 with
    compressed-tensors 0.20.1 does not load such a checkpoint (its meta-device setup allocates the zero points
    unpacked), so the check is against the compressor, not through from_pretrained."""
    ct()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from qpass.quantizer import quantizers

    qm = qpass.apply(llama128(), _w(bits=4, symmetric=False, **granularity))
    res = compressed_tensors(qm, tmp_path / "ct")
    ours = load_file(tmp_path / "ct" / "model.safetensors")
    scheme = QuantizationScheme(targets=["Linear"], weights=res.groups["group_0"]["weights"])
    gm = qm.graph_module
    for q in quantizers(gm, role="weight"):
        get = lambda n: functools.reduce(getattr, n.target.split("."), gm)   # noqa: E731
        scale, zp = get(q.scale), get(q.zero_point)
        shape = (scale.shape[0], -1)
        theirs = PackedQuantizationCompressor.compress(
            {"weight": get(q.x), "weight_scale": scale.reshape(shape),
             "weight_zero_point": (zp.to(torch.int16) - 8).to(torch.int8).reshape(shape)}, scheme)
        for k, v in theirs.items():
            assert torch.equal(ours[f"{q.path}.{k}"], v.to(ours[f"{q.path}.{k}"].dtype)), (q.path, k)


def _qpass_token_scales(monkeypatch):
    """Make compressed-tensors' dynamic per-token int scales qpass's (absmax / 127, as vLLM's kernels) instead of
    its reference absmax / 127.5: the one place where the two runtimes differ by design."""
    import compressed_tensors.quantization.lifecycle.forward as fwd

    original = fwd.compute_dynamic_scales_and_zp

    def scales(value, args, module, global_scale=None):
        scale, zp = original(value=value, args=args, module=module, global_scale=global_scale)
        if args.strategy == "token" and args.type == "int" and args.symmetric:
            qmax = 2 ** (args.num_bits - 1) - 1
            scale = (value.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-12).reshape(scale.shape)
        return scale, zp

    monkeypatch.setattr(fwd, "compute_dynamic_scales_and_zp", scales)


def test_w8a8_loads_in_transformers_with_the_fake_quant_logits(tmp_path, monkeypatch):
    ct()
    model, x = llama128(), toy.token_ids()
    qm = qpass.apply(model, W8A8)
    res, hf = _export_and_load(qm, tmp_path / "ct")
    g = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert g["format"] == "int-quantized" and g["input_activations"]["strategy"] == "token"
    assert g["input_activations"]["dynamic"] is True and res.notes
    _check_weights(qm, hf)
    ours, theirs = logits(qm, x), logits(hf, x)
    # as shipped, compressed-tensors' CPU reference rounds activations on a grid 127.5/127 finer than qpass's (and
    # vLLM's): an independent rounding of the same size as W8A8's own activation error, so the difference is
    # bounded by a small multiple of what activation quantization changes (W8A8 against W8A16)
    w8 = qpass.apply(model, _w(bits=8, granularity="per_channel"))
    act_effect = (ours - logits(w8, x)).abs().max()
    assert 0 < (theirs - ours).abs().max() < 3 * act_effect
    # with the runtime's per-token scale set to qpass's, the same computation: float rounding only
    _qpass_token_scales(monkeypatch)
    torch.testing.assert_close(logits(hf, x), ours, rtol=0, atol=1e-5)


def test_w8a8_static_exports_input_scales(tmp_path):
    ct()
    model, x = llama128(), toy.token_ids()
    recipe = {"version": 1, "passes": [{"quantize": {
        "weights": {"bits": 8, "granularity": "per_channel"},
        "activations": {"bits": 8, "granularity": "per_tensor", "symmetric": True}, "ignore": ["lm_head"]}}]}
    qm = qpass.apply(model, recipe, calib_data=[toy.token_ids(seed=s) for s in range(2)])
    _, hf = _export_and_load(qm, tmp_path / "ct")
    g = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert g["input_activations"]["strategy"] == "tensor" and g["input_activations"]["dynamic"] is False
    _check_weights(qm, hf)
    torch.testing.assert_close(logits(hf, x), logits(qm, x), rtol=0, atol=1e-4)


def test_mixed_schemes_make_one_group_each(tmp_path):
    ct()
    model, x = llama128(), toy.token_ids()
    recipe = {"version": 1, "passes": [
        {"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 128},
                      "targets": ["model.layers.*.mlp.*"], "ignore": ["lm_head"]}},
        {"quantize": {"weights": {"bits": 8, "granularity": "per_channel"},
                      "targets": ["model.layers.*.self_attn.*"]}}]}
    qm = qpass.apply(model, recipe)
    res, hf = _export_and_load(qm, tmp_path / "ct")
    assert len(res.groups) == 2 and all(g["targets"] != ["Linear"] for g in res.groups.values())
    assert sorted(len(g["targets"]) for g in res.groups.values()) == [6, 8]
    _check_weights(qm, hf)
    torch.testing.assert_close(logits(hf, x), logits(qm, x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ refusals by name, before anything is written


@pytest.mark.parametrize("recipe, part", [
    (_w(format="nf4", granularity="per_group", group_size=16), "format 'nf4'"),
    (_w(format="fp8_e5m2", granularity="per_channel"), "format 'fp8_e5m2'"),
    (_w(bits=4, granularity="per_group", group_size=24), "partial last group"),
    ({"version": 1, "passes": [{"kv_cache": {"keys": {"bits": 8, "granularity": "per_token", "dynamic": True},
                                             "values": {"bits": 8, "granularity": "per_token", "dynamic": True}}}]},
     "KV-cache quantizer"),
])
def test_refuses_what_it_cannot_express(tmp_path, recipe, part):
    qm = qpass.apply(toy.hf_model("llama"), recipe)
    with pytest.raises(UnsupportedOpError, match=part) as e:
        compressed_tensors(qm, tmp_path / "ct")
    assert "model.layers.0" in str(e.value)
    assert not (tmp_path / "ct").exists()


def test_refuses_a_plain_module():
    recipe = {"version": 1, "passes": [{"quantize": {"weights": {"bits": 8, "granularity": "per_channel"}}}]}
    qm = qpass.apply(toy.TinyMLP(), recipe, example_inputs=(toy.mlp_input(),))
    with pytest.raises(UnsupportedOpError, match="needs a Hugging Face model"):
        compressed_tensors(qm, "unused")


def test_cli_exports_a_saved_model(tmp_path, capsys):
    ct()
    import qpass.cli

    model, x = llama128(), toy.token_ids()
    qm = qpass.apply(model, W4_G128)
    qm.save(tmp_path / "q")
    toy.char_tokenizer().save_pretrained(tmp_path / "tok")
    assert qpass.cli.main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out",
                           str(tmp_path / "ct"), "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "group_0: pack-quantized, weights int4 group 128" in out and "left float: 1 linears" in out
    assert (tmp_path / "ct" / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(hf, x), logits(qm, x), rtol=0, atol=1e-5)
    assert qpass.cli.main(["export", str(tmp_path / "q"), "--out", str(tmp_path / "ct")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_fp8_kv_cache_scales_are_exported_and_int8_refused(tmp_path):
    ct()
    from safetensors.torch import load_file

    from qpass.quantizer import quantizers

    model, x = llama128(), toy.token_ids()
    kv = {"keys": {"format": "fp8_e4m3", "granularity": "per_tensor"},
          "values": {"format": "fp8_e4m3", "granularity": "per_tensor"}}
    calib = [toy.token_ids(seed=s) for s in range(3)]
    qm = qpass.apply(model, {"version": 1, "passes": [W4_G128["passes"][0], {"kv_cache": kv}]}, calib_data=calib)
    compressed_tensors(qm, tmp_path / "ct")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                       "dynamic": False, "group_size": None}
    saved = load_file(tmp_path / "ct" / "model.safetensors")
    gm = qm.graph_module
    for q in quantizers(gm):
        if q.role in ("key", "value"):
            assert torch.equal(saved[f"{q.path}.{q.role[0]}_scale"], getattr(gm, q.scale.target).float().reshape(1))
    # transformers 5.25 loads the weights quantized and ignores the KV scales (it does not apply kv_cache_scheme):
    # its logits are the weight-only model's; vLLM reads them for an fp8 cache
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(hf, x), logits(qpass.apply(model, W4_G128), x), rtol=0, atol=1e-5)
    int8 = {"keys": {"bits": 8, "granularity": "per_tensor"}, "values": {"bits": 8, "granularity": "per_tensor"}}
    q8 = qpass.apply(model, {"version": 1, "passes": [{"kv_cache": int8}]}, calib_data=calib)
    with pytest.raises(UnsupportedOpError, match="int8 KV cache"):
        compressed_tensors(q8, tmp_path / "ct8")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_experts_export_per_expert_and_load_in_transformers(tmp_path, family):
    """Quantized stacked experts are written in the layout transformers saves MoE models in (one linear per expert,
    its own renamings undone: Mixtral's block_sparse_moe.experts.<e>.w1/w2/w3), packed per expert; transformers
    reads them back through its conversion (dequantize, then stack): the fake-quant logits exactly."""
    ct()
    from safetensors import safe_open

    from .test_moe import W, captured

    model, _ = captured(family)
    x = toy.token_ids()
    qm = qpass.apply(model, W(), progress=False)
    res = compressed_tensors(qm, tmp_path / "ct")
    assert res.groups["group_0"]["targets"] == ["Linear"] and len(res.ignored) == 3   # lm_head + 2 routers
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert sum(k.endswith(".weight_packed") and ".experts." in k for k in keys) == 2 * 4 * 3   # layers x experts x 3
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(hf, x), logits(qm, x), rtol=0, atol=1e-5)
    assert (logits(qm, x) - logits(model, x)).abs().max() > 1e-3


def test_moe_mixed_schemes_and_refusals(tmp_path):
    ct()
    from .test_moe import captured

    model, _ = captured("mixtral")
    x = toy.token_ids()
    mixed = qpass.apply(model, {"version": 1, "passes": [
        {"quantize": {"weights": {"bits": 4, "granularity": "per_group", "group_size": 8},
                      "targets": ["*.experts.*"]}},
        {"quantize": {"weights": {"bits": 8, "granularity": "per_channel"}, "targets": ["*.self_attn.*"]}}]},
        progress=False)
    res = compressed_tensors(mixed, tmp_path / "ct")
    targets = sorted(t for g in res.groups.values() for t in g["targets"])
    assert len(res.groups) == 2 and r"re:.*\.experts\..*" in targets and "model.layers.0.self_attn.q_proj" in targets
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(hf, x), logits(mixed, x), rtol=0, atol=1e-5)
    asym = qpass.apply(model, {"version": 1, "passes": [{"quantize": {"weights": {
        "bits": 4, "granularity": "per_group", "group_size": 8, "symmetric": False}, "targets": ["*.experts.*"]}}]},
        progress=False)
    with pytest.raises(UnsupportedOpError, match=r"asymmetric int4 MoE experts"):
        compressed_tensors(asym, tmp_path / "asym")
    a8 = qpass.apply(model, {"version": 1, "passes": [{"quantize": {
        "weights": {"bits": 8, "granularity": "per_channel"},
        "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}, "targets": ["*.experts.*"]}}]},
        progress=False)
    with pytest.raises(UnsupportedOpError, match=r"activation quantization of MoE experts"):
        compressed_tensors(a8, tmp_path / "a8")
    # float experts: the model exports with its attention quantized, experts and router as they are
    attn = qpass.apply(model, {"version": 1, "passes": [{"quantize": {
        "weights": {"bits": 8, "granularity": "per_channel"}, "ignore": ["lm_head", "*.experts.*"]}}]}, progress=False)
    res = compressed_tensors(attn, tmp_path / "attn")
    assert len(res.quantized) == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "attn")
    torch.testing.assert_close(logits(hf, x), logits(attn, x), rtol=0, atol=1e-5)
