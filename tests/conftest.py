"""Suite-wide settings.

One intra-op thread per test process (pytest-xdist runs one process per core; more threads oversubscribe the
cores and make tiny-model tests many times slower).

CI runs `make test` (`-m "not slow"`), which must stay under 10 minutes on 2 cores. End-to-end checks that repeat
one code path over several variants (models, formats, passes) run one or a few representative variants there;
`make test-all` runs every variant. `CI_VARIANTS` below names, per test, the variants CI keeps: the rest are
marked `slow` at collection (`pytest --collect-only -q -m slow` lists them). A test absent from the table runs
all its variants in CI. The choice keeps each distinct path (static / dynamic activations, tied / untied heads,
Llama- and GPT-style families, streaming and refusing passes) in CI.
"""
import pytest
import torch

torch.set_num_threads(1)

CI_VARIANTS = {
    # apply_from_disk block by block == in memory, per pass: the spine, one blockwise-trained pass, one that
    # refuses streaming; the others share the same block sweep (qpass._api / qpass.streaming)
    "tests/test_plans.py::test_conformance_streams_or_refuses_up_front":
        {"quantize", "gptq", "awq", "smoothquant", "kv_cache", "omniquant", "norm_tweak"},
    # exact save/load per pass: the passes whose plans hold each kind of decision (quantizer meta, scales folded
    # into weights, added nodes, trained values, side channels, codebooks, per-layer formats, registered formats);
    # the per-method test files check their own save/load too
    "tests/test_plans.py::test_conformance_save_load_is_exact_runs_no_pass_and_plans_round_trip":
        {"quantize", "smoothquant", "kv_cache", "gptq", "awq", "qat", "lora_merge", "rotate", "spqr", "lorc",
         "omniquant", "mofq", "olive", "bcq"},
    "tests/test_streaming.py::test_streaming_equals_in_memory_bit_for_bit":
        {"llama-gptq-True", "llama-kv_static-False", "opt-smoothquant_static-False"},
    "tests/test_zeroquant_fp.py::test_fp8_activations_lower_to_onnx_float8_qdq_with_parity":
        {"llama-e4m3-static"},
    "tests/test_zeroquant_fp.py::test_fp4_weights_with_fp8_activations_lower_to_onnx_with_parity":
        {"recipes/zqfp_w4a8_fp_static.yaml"},
    "tests/test_rptq.py::test_lowers_to_torch_and_onnx_with_parity_and_reloads": {"llama"},
    "tests/test_squeezellm.py::test_torch_lowering_is_exact_and_saves_and_loads": {"llama"},
    "tests/test_lm_head_tied.py::test_torch_packed_gathers_rows_of_the_packed_codes": {"llama_tied-int4", "opt-int8"},
    "tests/test_lm_head.py::test_quantized_lm_head_lowers_to_onnx_with_parity_and_a_tied_weight_is_reported":
        {"llama_tied-lmhead4_g16", "llama-lmhead8"},
    "tests/test_lm_head.py::test_quantized_lm_head_lowers_to_torch_packed_with_parity":
        {"llama_tied-lmhead4_g16", "llama-lmhead8"},
    "tests/test_lm_head.py::test_lm_head_is_quantized_and_the_embedding_lookup_stays_float":
        {"llama-lmhead4_g16", "llama_tied-lmhead8"},
    "tests/test_torch_packed.py::test_bundled_model_greedy_tokens_equal_fake_quant": {"recipes/w4a16_g128.yaml"},
    "tests/test_decode_runtime.py::test_optimized_decode_generates_the_same_tokens": {"llama", "opt"},
    "tests/test_lorc.py::test_lorc_lowers_to_both_backends_with_parity": {"w4a8"},
    "tests/test_qat.py::test_two_processes_match_one_process": {"ddp"},
    "tests/test_codebook_lowering.py::test_torch_codebook_linears_store_b_bit_codes_and_match_fake_quant":
        {"llama-cb4_channel_sparse", "gpt2-cb3_g16", "llama-cb2_g8_sparse"},
    "tests/test_blockwise.py::test_let_trains_folds_and_lowers_with_parity": {"llama"},
    "tests/test_quantease.py::test_quantease_fires_at_or_below_gptq_on_every_layer_and_keeps_the_graph":
        {"weights0"},
}


def pytest_collection_modifyitems(config, items):
    seen = {name: set() for name in CI_VARIANTS}
    for item in items:
        name, _, variant = item.nodeid.partition("[")
        if name in CI_VARIANTS:
            variant = variant[:-1]
            seen[name].add(variant)
            if variant not in CI_VARIANTS[name]:
                item.add_marker(pytest.mark.slow)
    whole_files = not config.option.keyword and all("::" not in str(a) for a in config.args)
    for name, kept in CI_VARIANTS.items():          # a renamed test or variant must not drop out of CI silently
        collected = seen[name]
        if whole_files and collected and not kept <= collected:
            raise pytest.UsageError(f"tests/conftest.py CI_VARIANTS[{name!r}] names variants that were not "
                                    f"collected: {sorted(kept - collected)} (collected: {sorted(collected)})")


# ------------------------------------------------------------------ capture cache (tests only)
# torch.export of a toy Hugging Face model is most of the suite's time (about two thirds of a typical test file's),
# and most tests export the same few toy configurations again. The wrapper below keeps the ExportedProgram of each
# HF model qpass.capture exports (its `_CausalLM` root) under a key of everything the graph depends on (model and
# submodule classes and their forward functions, config, parameter and buffer names, shapes and dtypes, training
# flag, input shapes and dtypes, dynamic shapes) and, for the next model with the same key, returns a copy bound to
# that model's own parameters and buffers, as a fresh export would be (ExportedProgram.module() deep-copies the
# graph on each call). The first export of each configuration is a real one and failed exports are not cached, so
# capture's own checks and errors are exercised as before; only qpass.capture's HF root is cached (toy nn.Modules,
# decode-step and ONNX exports are not). QPASS_TEST_CAPTURE_CACHE=0 turns it off.
import copy
import os

_EXPORT = torch.export.export
_CACHE: dict = {}


def _spec(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_spec(v) for v in x))
    if isinstance(x, dict):
        return ("D", tuple((k, _spec(v)) for k, v in sorted(x.items())))
    return ("V", repr(x))


def _capture_key(mod, args, kwargs):
    if type(mod).__name__ != "_CausalLM" or type(mod).__module__ != "qpass.capture" or kwargs.get("strict", True):
        return None
    model = mod.model
    cfg = getattr(model, "config", None)
    if not hasattr(cfg, "to_json_string") or any("forward" in vars(m) for m in mod.modules()):
        return None                         # not a transformers config, or an instance-patched forward
    classes = tuple(sorted({(type(m).__module__, type(m).__qualname__, id(type(m).forward)) for m in mod.modules()}))
    tensors = tuple((n, tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
                    for n, t in [*mod.named_parameters(remove_duplicate=False),
                                 *mod.named_buffers(remove_duplicate=False)])
    return (classes, cfg.to_json_string(use_diff=False), getattr(cfg, "_attn_implementation", None), tensors,
            tuple(m.training for m in mod.modules()), torch.is_grad_enabled(), torch.get_default_dtype(),
            _spec(args), repr(kwargs.get("dynamic_shapes")),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in ("dynamic_shapes", "strict"))))


def _rebound(ep, mod):
    named = {**dict(mod.named_parameters(remove_duplicate=False)), **dict(mod.named_buffers(remove_duplicate=False))}
    new = copy.copy(ep)
    new._state_dict = {k: named[k] for k in ep.state_dict}
    new._constants = {k: named[k] if k in named else (v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in ep.constants.items()}
    return new


def _cached_export(mod, args=(), kwargs=None, **kw):
    key = _capture_key(mod, args, kw) if kwargs is None else None
    if key is not None and key in _CACHE:
        return _rebound(_CACHE[key], mod)
    ep = _EXPORT(mod, args, kwargs, **kw)
    if key is not None:
        _CACHE[key] = ep
    return ep


if os.environ.get("QPASS_TEST_CAPTURE_CACHE", "1") != "0":
    torch.export.export = _cached_export


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one thread, whatever an earlier test in this process set."""
    torch.set_num_threads(1)
    yield
