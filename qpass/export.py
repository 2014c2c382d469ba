r"""Export a quantized model to the compressed-tensors layout, which transformers loads with its quantization
(``from_pretrained`` with the ``compressed-tensors`` package installed) and vLLM serves.

    qpass.export.compressed_tensors(qm, "out/", tokenizer_dir="hf_model/")
    qpass export QPASS_DIR --format compressed-tensors --out OUT [--tokenizer HF_DIR]

What is written (names and packing as the compressed-tensors package reads them; our own code)::

    config.json        the model's config + quantization_config {quant_method: compressed-tensors,
                       format, quantization_status: compressed, config_groups, ignore, kv_cache_scheme}
    model.safetensors  every tensor of the model under its transformers name; a quantized linear's weight as
                         pack-quantized   weight_packed int32 [out, ceil(in*b/32)] (codes + 2^(b-1), 32
                                          codes in b words, little-endian bit order), weight_shape, weight_scale,
                                          weight_zero_point (asymmetric: packed along the rows)
                         int-quantized    weight int8 (W8A8 with int8 activations), weight_scale[, zero point]
                         float-quantized  weight float8_e4m3fn, weight_scale
                       and input_scale / input_zero_point for static activation scales

Expressible (one config group per distinct scheme): int weights of 2..8 bits, fp8_e4m3 weights, per-tensor,
per-channel (rows) or per-group (along the input features, full groups) scales, symmetric or asymmetric;
activations int or fp8_e4m3, dynamic per-token or static per-tensor. Refused by name (UnsupportedOpError
naming the node and module): nf4, fp4, fp8_e5m2, learned codebooks, side channels (outliers, float columns,
quantized scales), partial last groups, quantizers on weights that are not an ``nn.Linear``'s (GPT-2's
Conv1D, a tied lm_head) or a MoE's stacked experts, KV-cache quantizers other than static per-tensor fp8_e4m3 after RoPE (the
kv_cache_scheme: one static scale per K and V tensor, served by vLLM as an fp8 cache; written as
``<attention>.k_scale`` / ``v_scale``), and tensors a pass added that the transformers model has no place for (OS+ biases,
unmerged LoRA adapters).

MoE models: stacked expert weights quantized per expert (symmetric int, weight-only) are written in the layout
transformers saves MoE models in (its own reverse conversion: one linear per expert, e.g. Mixtral's
``block_sparse_moe.experts.<e>.w1``), packed per expert, in a config group targeting ``re:.*\.experts\..*`` (or
the one ``Linear`` group); routers are listed in ``ignore``. transformers reads them back through its conversion
(dequantize each expert, then stack).

The codes are qpass's own (``qpass.primitives.quant.quantize`` with the model's scales), so the dequantized
weights transformers builds are qpass's fake-quant weights. Activations are quantized by the runtime:
compressed-tensors' reference divides the per-token absmax by 127.5, vLLM's kernels and qpass by 127, so
W8A8 logits agree to within that rounding difference, not bit for bit (docs/export.md).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from .artifacts import atomic_directory, write_safetensors
from .errors import ArtifactError, UnsupportedOpError
from .experts import expert_sites, routers
from .graph import META_PREFIX
from .primitives.quant import quantize
from .quantizer import Quantizer, quantizers
from .version import __version__

FORMATS = ("compressed-tensors",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass
class ExportResult:
    """What an export wrote: `groups` {group name: {targets, format, ...}}, `ignored` linears left float,
    `quantized` linears, and `notes` (what a reader should know, e.g. the activation-scale rounding)."""

    directory: str
    groups: dict
    quantized: list[str]
    ignored: list[str]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- schemes


def _refuse(q: Quantizer, part: str, fix: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"compressed-tensors export cannot express {part}",
                              where=f"node {q.node.name!r} ({q.role} of {q.path or '?'})", fix=fix)


def _format_args(q: Quantizer) -> dict:
    """num_bits and type of a quantizer's format, or a refusal by name."""
    f = q.fmt
    if f.kind == "int":
        return {"num_bits": f.bits, "type": "int"}
    if f.kind == "float" and f.name == "fp8_e4m3":
        return {"num_bits": 8, "type": "float"}
    raise _refuse(q, f"format {q.fmt_name!r} (it has int2..int8 and fp8_e4m3)",
                  "quantize this part with an int or fp8_e4m3 format, or keep qpass's own artefact (qpass.load)")


def _no_side(q: Quantizer) -> None:
    if q.side_channels or q.codebook is not None:
        part = f"side channels {list(q.side_channels.names)}" if q.side_channels else "a learned codebook"
        raise _refuse(q, part, "use a recipe without them (OWQ, LLM.int8(), double_quant and codebooks stay qpass "
                               "artefacts)")


def weight_args(q: Quantizer, shape: tuple[int, int], block=None) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) of a weight quantizer on a [out, in] weight (`block`: the
    quantizer's block on it, default q.block; one expert's of a stacked expert weight)."""
    _no_side(q)
    out = {**_format_args(q), "symmetric": q.symmetric, "dynamic": False}
    block = tuple(q.block if block is None else block)
    if block == (-1, -1):
        out.update(strategy="tensor", group_size=None)
    elif block == (1, -1):
        out.update(strategy="channel", group_size=None)
    elif block[0] == 1 and block[1] > 1:
        if shape[1] % block[1]:
            raise _refuse(q, f"a partial last group ({shape[1]} input features in groups of {block[1]}: "
                             "compressed-tensors' group forward requires whole groups)",
                          "use a group size that divides the input features, or per-channel scales")
        out.update(strategy="group", group_size=block[1])
    else:
        raise _refuse(q, f"weight block {block} (it has per-tensor, per-row and per-group along the inputs)",
                      "use per_tensor, per_channel (axis 0) or per_group weights")
    if out["type"] == "float" and not q.symmetric:
        raise _refuse(q, "asymmetric fp8 weights", "use symmetric fp8 weights")
    return out


def kv_args(q: Quantizer) -> dict:
    """kv_cache_scheme args of a K or V quantizer: static per-tensor symmetric scales on K after RoPE (and V), as
    compressed-tensors quantizes them at the cache write; anything else is refused by name."""
    _no_side(q)
    if q.dynamic or any(b != -1 for b in q.block) or not q.symmetric:
        kind = "dynamic" if q.dynamic else "static"
        raise _refuse(q, f"a {kind} KV-cache quantizer with block {tuple(q.block)}"
                         f"{'' if q.symmetric else ', asymmetric'} (kv_cache_scheme holds one static symmetric "
                         "scale per tensor for K and for V)",
                      "use kv_cache keys/values {granularity: per_tensor, symmetric: true} (static, calibrated), "
                      "or export without the kv_cache pass")
    if q.fmt.kind != "float" or q.fmt_name != "fp8_e4m3":
        raise _refuse(q, f"a {q.fmt_name} KV cache (the kv_cache_scheme's scales are served by vLLM as an fp8_e4m3 "
                         "cache; transformers 5.25 does not apply them)",
                      "quantize K and V to fp8_e4m3 per_tensor (static), or export without the kv_cache pass")
    if q.meta.get("position") not in (None, "attention_input"):
        raise _refuse(q, f"K quantized at {q.meta.get('position')!r} (compressed-tensors quantizes K after RoPE, "
                         "where the cache stores it)", "use k_position: post_rope")
    return {**_format_args(q), "symmetric": True, "strategy": "tensor", "dynamic": False, "group_size": None}


def _kv_scheme(kv: dict) -> dict | None:
    """One kv_cache_scheme for every attention: K and V of each with the same args, or a refusal."""
    if not kv:
        return None
    seen = {json.dumps(a, sort_keys=True): q for roles in kv.values() for q, a in roles.values()}
    missing = [(p, r) for p, roles in kv.items() for r in ("key", "value") if r not in roles]
    if len(seen) > 1 or missing:
        q = next(iter(seen.values()))
        raise _refuse(q, "KV-cache quantizers that differ between K and V or between layers, or K without V"
                         f"{f' ({missing[0][1]} of {missing[0][0]} is float)' if missing else ''} "
                         "(kv_cache_scheme is one scheme for every K and V)", "quantize K and V alike everywhere")
    return json.loads(next(iter(seen)))


def input_args(q: Quantizer) -> dict:
    """QuantizationArgs of an activation (linear input) quantizer: dynamic per-token or static per-tensor."""
    _no_side(q)
    out = {**_format_args(q), "symmetric": q.symmetric}
    block = tuple(q.block)
    if q.dynamic and all(b == 1 for b in block[:-1]) and block[-1] == -1:
        out.update(strategy="token", dynamic=True, group_size=None)
    elif not q.dynamic and all(b == -1 for b in block):
        out.update(strategy="tensor", dynamic=False, group_size=None)
    else:
        kind = "dynamic" if q.dynamic else "static"
        raise _refuse(q, f"{kind} activation block {block} (it has dynamic per-token and static per-tensor)",
                      "quantize activations per_token (dynamic) or per_tensor (static)")
    return out


# ---------------------------------------------------------------------------------------------- tensors


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed `bits`-bit codes (any int dtype, in [-2^(b-1), 2^(b-1)-1]) of a 2-D tensor into int32 along
    `dim`: each code is offset by 2^(b-1) to unsigned, 32 consecutive codes fill exactly `bits` words (code i at
    bit i*b, little-endian, crossing word boundaries), the last group padded with zeros; ceil(n*b/32) words are
    kept. This is compressed-tensors' pack-quantized layout."""
    v = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.t()
    rows, n = v.shape
    v = nn.functional.pad(v, (0, -n % 32)).reshape(rows, -1, 32)          # [rows, groups, 32]
    start = torch.arange(32) * bits                                       # bit offset of each code
    words = torch.zeros(rows, v.shape[1], bits + 1, dtype=torch.int64)
    words.scatter_add_(2, (start // 32).expand_as(v), (v << (start % 32)) & 0xFFFFFFFF)
    words.scatter_add_(2, (start // 32 + 1).expand_as(v), v >> (32 - start % 32))   # the spill-over bits
    words = words[..., :bits].reshape(rows, -1)[:, :-(-n * bits // 32)]
    out = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return (out.t() if dim == 0 else out).contiguous()


def _scale_2d(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.detach().float().reshape(rows, -1) if t.numel() > 1 else t.detach().float().reshape(1)


def weight_tensors(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, block,
                   fmt: str, args: dict, layout: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear's weight (names relative to the module)."""
    codes = quantize(weight.detach().float(), scale.detach().float(),
                     None if zero_point is None else zero_point.detach(), block, fmt)
    rows = weight.shape[0]
    out = {"weight_scale": _scale_2d(scale, rows)}
    zp = None
    if args["type"] == "int":
        offset = 1 << (args["num_bits"] - 1)
        codes = codes.to(torch.int16) - (0 if zero_point is None else offset)   # unsigned asym codes -> signed
        if zero_point is not None:
            zp = (zero_point.detach().to(torch.int16) - offset).reshape(out["weight_scale"].shape)
    if layout == "pack-quantized":
        out["weight_packed"] = pack_int32(codes, args["num_bits"])
        out["weight_shape"] = torch.tensor(tuple(weight.shape), dtype=torch.int64)
        if zp is not None:
            out["weight_zero_point"] = (pack_int32(zp, args["num_bits"], dim=0) if args["strategy"] != "tensor"
                                        else zp.to(torch.int8).reshape(1))
    else:
        out["weight"] = codes.to(torch.int8) if args["type"] == "int" else codes
        if zp is not None:
            out["weight_zero_point"] = zp.to(torch.int8).reshape(out["weight_scale"].shape)
    return out


EXPERTS_TARGET = r"re:.*\.experts\..*"     # the config group of MoE experts (transformers picks it by 'experts')


def _expert_args(q: Quantizer, site) -> dict:
    """Per-expert QuantizationArgs of a stacked [E, out, in] expert weight quantizer, or a refusal by name."""
    if site.in_axis != 2:
        raise _refuse(q, "stacked expert weights stored [experts, in, out]", "keep qpass's own artefact")
    shape = tuple(site.weight.meta["val"].shape)
    args = weight_args(q, shape[1:], block=tuple(q.block)[1:])
    if args["type"] != "int" or not args["symmetric"]:
        raise _refuse(q, f"{'asymmetric ' if not args['symmetric'] else ''}{q.fmt_name} MoE experts (transformers' "
                         "compressed-tensors loader reads symmetric packed int experts)",
                      "quantize the experts to symmetric int2..int8")
    return args


def _per_expert_layout(hf, gm, tensors: dict, moe: dict, ignored: list, groups: dict):
    """Tensors, ignore list and group targets in the layout transformers saves MoE models in (its own reverse
    conversion: stacked experts split into one linear per expert, module renamings undone), with each quantized
    expert's codes packed and its scales split the same way."""
    from transformers.core_model_loading import revert_weight_conversion

    def legacy(names):      # module names in the saved layout
        out = revert_weight_conversion(hf, {f"{n}.weight": torch.empty(1, 1) for n in names})
        return sorted(k.removesuffix(".weight") for k in out)

    tensors = dict(revert_weight_conversion(hf, tensors))
    for name, (q, args) in moe.items():
        w = _graph_tensor(gm, q.x.target)
        scale = _graph_tensor(gm, q.scale.target).detach().float()
        codes = quantize(w.detach().float(), scale, None, q.block, q.fmt_name)
        codes_e = revert_weight_conversion(hf, {name: codes})
        scales_e = revert_weight_conversion(hf, {name: scale})
        for key, c in codes_e.items():
            module = key.removesuffix(".weight")
            tensors[f"{module}.weight_packed"] = pack_int32(c, args["num_bits"])
            tensors[f"{module}.weight_shape"] = torch.tensor(tuple(c.shape), dtype=torch.int64)
            tensors[f"{module}.weight_scale"] = scales_e[key].contiguous()
    for g in groups.values():
        if g["targets"] != ["Linear"]:
            g["targets"] = legacy([t for t in g["targets"] if t != EXPERTS_TARGET]) + \
                ([EXPERTS_TARGET] if EXPERTS_TARGET in g["targets"] else [])
    return tensors, legacy(ignored), groups


def _layout(wargs: dict, iargs: dict | None) -> str:
    if wargs["type"] == "float":
        return "float-quantized" if iargs is not None else "naive-quantized"
    if iargs is not None and wargs["num_bits"] == 8:
        return "int-quantized"
    return "pack-quantized"


# ---------------------------------------------------------------------------------------------- export


def _skeleton(cfg: dict) -> nn.Module:
    """The transformers model of `cfg` on the meta device: its module types and state-dict names."""
    import transformers

    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _graph_tensor(gm, name: str) -> torch.Tensor | None:
    try:
        return gm.get_parameter(name)
    except AttributeError:
        try:
            return gm.get_buffer(name)
        except AttributeError:
            return None


def compressed_tensors(qm, directory: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None
                       ) -> ExportResult:
    """Write `qm` (a QuantizedModel of a Hugging Face causal LM) to `directory` in the compressed-tensors
    layout (see the module docstring); refuses what that format cannot express with an UnsupportedOpError
    naming the node, before anything is written. `tokenizer_dir`: copy its tokenizer files too."""
    cfg = (qm.source or {}).get("hf_config")
    if cfg is None:
        raise UnsupportedOpError("compressed-tensors export needs a Hugging Face model (config.json): this one was "
                                 "quantized from a plain nn.Module", fix="quantize a transformers causal LM")
    gm = qm.graph_module
    prefix = gm.meta.get(META_PREFIX, "")
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "quantization_config",
                                                     "transformers_weights")}
    hf = _skeleton(cfg)
    hf_names = set(hf.state_dict())
    known = hf_names | {n for n, _ in hf.named_buffers(remove_duplicate=False)}   # rotary tables: not saved
    linears = {n for n, m in hf.named_modules() if isinstance(m, nn.Linear)}

    schemes: dict[str, dict] = {}       # linear path -> {"weights", "input_activations", "q"}
    experts = {e.key: e for e in expert_sites(gm)}
    moe: dict[str, tuple] = {}          # stacked expert weight name -> (quantizer, per-expert args)
    kv: dict[str, dict] = {}            # attention path -> {"key" | "value": (quantizer, args)}
    used: set[str] = set()              # graph tensor names a quantizer owns
    for q in quantizers(gm):
        for arg in (q.scale, q.zero_point):
            if arg is not None and arg.op == "get_attr":
                used.add(arg.target)
        if q.role == "weight" and q.path in experts:
            moe[q.path] = (q, _expert_args(q, experts[q.path]))
        elif q.role == "input" and q.path in experts:
            raise _refuse(q, "activation quantization of MoE experts (transformers' compressed-tensors loader "
                             "dequantizes experts to float)", "quantize the experts' weights only")
        elif q.role == "weight":
            w = q.x
            name = w.target[len(prefix):] if w.op == "get_attr" and w.target.startswith(prefix) else None
            if name is None or name != f"{q.path}.weight" or q.path not in linears:
                raise _refuse(q, "a quantized weight that is not an nn.Linear's own weight (Conv1D, a matmul "
                                 "against a parameter, a tied lm_head)",
                              "leave it float (quantize: ignore) or keep qpass's own artefact")
            schemes.setdefault(q.path, {})["weights"] = weight_args(q, tuple(w.meta["val"].shape))
            schemes[q.path]["q"] = q
        elif q.role == "input":
            if q.path not in linears:
                raise _refuse(q, "an input quantizer of a module that is not an nn.Linear", "leave it float")
            schemes.setdefault(q.path, {})["input_activations"] = input_args(q)
        elif q.role in ("key", "value"):
            kv.setdefault(q.path, {})[q.role] = (q, kv_args(q))
        else:
            raise _refuse(q, f"a quantizer of role {q.role!r}", "export a recipe of weight and input quantizers")
    for path, s in schemes.items():
        if "weights" not in s:
            raise UnsupportedOpError("compressed-tensors export cannot express activation quantization without "
                                     "weight quantization", where=path, fix="quantize the weight too")

    extra = sorted(n[len(prefix):] for n, _ in [*gm.named_parameters(), *gm.named_buffers()]
                   if n not in used and n[len(prefix):] not in known and n.startswith(prefix))
    extra = [n for n in extra if not any(n == f"{p}.weight" for p in schemes) and n not in moe]
    if extra:
        raise UnsupportedOpError(f"compressed-tensors export: the quantized graph has tensors the transformers "
                                 f"model has no place for: {extra[:5]}{' ...' if len(extra) > 5 else ''}",
                                 fix="merge or drop what a pass added (lora_merge for adapters); passes that add "
                                     "biases (os_plus) or parameters stay qpass artefacts (qpass.load)")

    kv_scheme = _kv_scheme(kv)
    groups: dict[str, dict] = {}
    for path in sorted(schemes):
        s = schemes[path]
        iargs = s.get("input_activations")
        key = json.dumps([s["weights"], iargs], sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": s["weights"], "input_activations": iargs,
                                    "output_activations": None, "format": _layout(s["weights"], iargs)})
        g["targets"].append(path)
    for name, (_, wargs) in sorted(moe.items()):
        key = json.dumps([wargs, None], sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": wargs, "input_activations": None,
                                    "output_activations": None, "format": _layout(wargs, None)})
        if EXPERTS_TARGET not in g["targets"]:
            g["targets"].append(EXPERTS_TARGET)
    ignored = sorted(linears - set(schemes)) + sorted(routers(gm))
    config_groups = {}
    for i, g in enumerate(groups.values()):
        if len(groups) == 1:
            g["targets"] = ["Linear"]            # every nn.Linear but those in ignore
        config_groups[f"group_{i}"] = g
    formats = {g["format"] for g in groups.values()}
    qcfg = {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else
            "mixed-precision", "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": ignored, "kv_cache_scheme": kv_scheme, "global_compression_ratio": None}

    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(hf_names):
        module = name.rsplit(".", 1)[0]
        if (module in schemes and name == f"{module}.weight") or name in moe:
            continue
        t = _graph_tensor(gm, prefix + name)
        if t is None:
            raise UnsupportedOpError(f"compressed-tensors export: the quantized graph has no tensor {name!r} "
                                     "that the transformers model has", fix="export a model captured from this "
                                     "config (qpass.apply / qpass.load)")
        tensors[name] = t.detach().contiguous().clone()
    for path, s in schemes.items():
        q, wa = s["q"], s["weights"]
        iargs = s.get("input_activations")
        w = _graph_tensor(gm, q.x.target)
        scale = _graph_tensor(gm, q.scale.target)
        zp = _graph_tensor(gm, q.zero_point.target) if q.zero_point is not None else None
        for k, v in weight_tensors(w, scale, zp, q.block, q.fmt_name, wa, _layout(wa, iargs)).items():
            tensors[f"{path}.{k}"] = v
        iq = next((x for x in quantizers(gm, role="input") if x.path == path), None) if iargs else None
        if iq is not None and not iq.dynamic:
            tensors[f"{path}.input_scale"] = _graph_tensor(gm, iq.scale.target).detach().float().reshape(1).clone()
            if iq.zero_point is not None:
                off = 1 << (iq.fmt.bits - 1)
                tensors[f"{path}.input_zero_point"] = (_graph_tensor(gm, iq.zero_point.target).detach()
                                                       .to(torch.int16) - off).to(torch.int8).reshape(1)

    for path, roles in kv.items():
        for role, (q, _) in roles.items():
            tensors[f"{path}.{role[0]}_scale"] = _graph_tensor(gm, q.scale.target).detach().float().reshape(1).clone()
    if moe:      # the checkpoint layout transformers and vLLM read MoE checkpoints in: one tensor per expert
        tensors, ignored, config_groups = _per_expert_layout(hf, gm, tensors, moe, ignored, config_groups)
        qcfg["ignore"] = ignored
    notes = []
    if any(g["input_activations"] and g["input_activations"]["dynamic"] for g in groups.values()):
        notes.append("dynamic activation scales are the runtime's: compressed-tensors' reference uses absmax/127.5, "
                     "vLLM and qpass absmax/127")
    with atomic_directory(directory, prefix=".qpass-export-") as tmp:
        write_safetensors({k: v for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                          metadata={"format": "pt", "qpass_version": __version__})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**cfg, "quantization_config": qcfg}, f, indent=2, sort_keys=True)
            f.write("\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(os.fspath(tokenizer_dir), name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
    return ExportResult(os.fspath(directory), config_groups, sorted(schemes), ignored, notes)


def export(qm, directory: str | os.PathLike, format: str = "compressed-tensors", **kw) -> ExportResult:
    """``qpass.export(qm, dir, format)``: the one format is ``compressed-tensors`` (:func:`compressed_tensors`)."""
    if format not in FORMATS:
        raise ArtifactError(f"unknown export format {format!r}", fix=f"use one of {list(FORMATS)}")
    return compressed_tensors(qm, directory, **kw)


__all__ = ["export", "compressed_tensors", "ExportResult", "pack_int32", "weight_args", "input_args", "FORMATS"]
