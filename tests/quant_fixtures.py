"""Tiny quantized Llama 4 checkpoints in every published on-disk format, built offline, plus their
independent float32 references (see /work/shared/docs/quantization.md §1.1, §1.4, §4.6).

- compressed-tensors (CT) formats are produced by compressed-tensors itself, the way llm-compressor
  does it: the fused experts of each MoE layer are replaced by E per-expert Linears
  (`experts.{e}.gate_proj/up_proj/down_proj`), `apply_quantization_config` attaches the scheme,
  the qparams come from CT's `calculate_qparams` (min/max per row, group, tensor or 128x128 block of
  the bf16 weight, in bf16, as CT's observers compute them), `ModelCompressor.compress_model`
  packs / casts the weights and `ModelCompressor.update_config` writes `quantization_config`.
- `int4-group-actorder` is the legacy GPTQ `actorder: "group"` layout (`weight_g_idx`), which
  compressed-tensors 0.20 no longer accepts (its QuantizationArgs validator rejects
  `actorder="group"` and its compressors ignore g_idx). It is made with CT's own functions on the
  column-permuted weight (group j = the columns c with g_idx[c] == j, g_idx a random permutation of
  columns cut into groups), the packed codes are stored in the original column order, and
  `"actorder": "group"` is written into config.json afterwards. Semantics (those of CT <= 0.12
  and vLLM): W[r, c] = (q[r, c] - z[r, g_idx[c]]) * s[r, g_idx[c]].
- `fbgemm-fp8` (transformers' FbgemmFp8Config) is written by hand (transformers refuses to quantize
  it without CUDA): per Linear `weight` F8_E4M3 + `weight_scale` F32 [out, 1]; experts stay fused,
  `experts.gate_up_proj` F8 [E, H, 2I] + `gate_up_proj_scale` F32 [E, 1, 2I] and
  `experts.down_proj` F8 [E, I, H] + `down_proj_scale` F32 [E, H, 1] (one scale per output column
  h, so it is indexed [e, h, 0]: transpose it before broadcasting against [E, I, H]).

The fixture model is tiny_models' seeded bf16 model (`text_config(variant)`, torch.manual_seed(seed),
then `.to(bfloat16)`, as tiny_models.build does), so its weights are tiny_models' random weights.
Group formats need every quantized Linear's in_features to be a multiple of group_size (CT 0.20 raises
otherwise), so for them an MLP width (`intermediate_size`, `intermediate_size_mlp`) that is not is
rounded up to a multiple of group_size, skipping hidden_size so that [I, H] and [H, I] stay
distinguishable (g 32: scout intermediate_size 48 -> 96, chunked 40 -> 64 and intermediate_size_mlp
72 -> 128); hidden_size must already be a multiple (ValueError otherwise: maverick's 80 at g 32).
Other text-config fields can be overridden like tiny_models.build's `**overrides`.

This module must not import corral: it is the independent side of the loader tests.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts, Llama4TextMoe
from transformers.quantizers.quantizers_utils import should_convert_module

from tiny_models import TEXT_CONFIGS, VISION_CONFIG, text_config

FORMATS = [
    "int4-group-sym",
    "int4-group-asym",
    "int4-channel-sym",
    "int8-channel-sym",
    "int8-group-asym",
    "int4-group-actorder",
    "fp8-channel-dynamic",
    "fp8-tensor",
    "fp8-block",
    "fbgemm-fp8",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FBGEMM_ACTIVATION_SCALE_UB = 1200.0
MM_PREFIX = "language_model."  # text tensors of a Llama4ForConditionalGeneration checkpoint

# llm-compressor's Llama 4 recipe (LLMC examples/multimodal_vision/llama4_example.py): these stay
# 16-bit. CT saves them expanded to explicit module paths.
_LLMC_IGNORE = ["re:.*lm_head", "re:.*self_attn.*", "re:.*router", "re:.*vision_model.*",
                "re:.*multi_modal_projector.*"]

_PACKED, _FLOAT = "pack-quantized", "float-quantized"
_FP8_TOKEN = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
_FP8_GROUP128 = dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=128, dynamic=True)


def _format_spec(fmt: str, group_size: int) -> tuple[dict, dict | None, str]:
    """(weights args, input_activations args or None, CT format) of a compressed-tensors format."""

    def w(num_bits, type_, strategy, symmetric=True, **kw):
        return dict(num_bits=num_bits, type=type_, symmetric=symmetric, strategy=strategy, dynamic=False, **kw)

    table = {
        "int4-group-sym": (w(4, "int", "group", group_size=group_size), None, _PACKED),
        "int4-group-asym": (w(4, "int", "group", False, group_size=group_size), None, _PACKED),
        "int4-channel-sym": (w(4, "int", "channel"), None, _PACKED),
        "int8-channel-sym": (w(8, "int", "channel"), None, _PACKED),
        "int8-group-asym": (w(8, "int", "group", False, group_size=group_size), None, _PACKED),
        "int4-group-actorder": (w(4, "int", "group", group_size=group_size), None, _PACKED),
        "fp8-channel-dynamic": (w(8, "float", "channel"), _FP8_TOKEN, _FLOAT),  # CT preset FP8_DYNAMIC
        "fp8-tensor": (w(8, "float", "tensor"), None, _FLOAT),  # weight-only, per-tensor scale
        "fp8-block": (w(8, "float", "block", block_structure=[128, 128]), _FP8_GROUP128, _FLOAT),  # FP8_BLOCK
    }
    if fmt not in table:
        raise ValueError(f"unknown compressed-tensors format {fmt!r} (formats: {FORMATS})")
    return table[fmt]


def _is_group_format(fmt: str) -> bool:
    return "-group-" in fmt


# ----------------------------------------------------------------------------- the bf16 model


def _text_overrides(fmt: str, variant: str, group_size: int, overrides: dict) -> dict:
    """overrides, plus MLP widths rounded up to a multiple of group_size for group formats."""
    out = dict(overrides)
    if not _is_group_format(fmt):
        return out
    cfg = copy.deepcopy(TEXT_CONFIGS[variant]) | out
    if cfg["hidden_size"] % group_size:
        raise ValueError(f"{fmt}: group_size {group_size} does not divide hidden_size {cfg['hidden_size']} "
                         f"of variant {variant!r} (pass a group_size that does, or hidden_size=...)")
    for key in ("intermediate_size", "intermediate_size_mlp"):
        if cfg[key] % group_size:
            width = -(-cfg[key] // group_size) * group_size
            if width == cfg["hidden_size"]:  # keep [I, H] and [H, I] distinguishable
                width += group_size
            out[key] = width
    return out


def _seeded_model(variant: str, multimodal: bool, seed: int, overrides: dict) -> torch.nn.Module:
    """tiny_models.build's model, in bf16 (same seeding, same construction)."""
    torch.manual_seed(seed)
    tc = text_config(variant, **overrides)
    if multimodal:
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=tc.to_dict(), vision_config=VISION_CONFIG))
    else:
        model = Llama4ForCausalLM(tc)
    return model.to(torch.bfloat16).eval()


def _text_of(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the Llama4ForCausalLM, its module-path prefix in the checkpoint)."""
    if isinstance(model, Llama4ForConditionalGeneration):
        return model.language_model, MM_PREFIX
    return model, ""


def _moe_layers(lm: torch.nn.Module):
    for i, layer in enumerate(lm.model.layers):
        if isinstance(layer.feed_forward, Llama4TextMoe):
            yield i, layer.feed_forward


def _unfuse_experts(lm: torch.nn.Module) -> None:
    """Replaces every Llama4TextExperts by transformers' SequentialLlama4TextExperts (E x
    Llama4TextMLP with gate_proj/up_proj/down_proj), as llm-compressor and transformers' CT loader do:
    gate = gate_up_proj[e][:, :I].T, up = gate_up_proj[e][:, I:].T, down = down_proj[e].T."""
    from transformers.quantizers.base import SequentialLlama4TextExperts

    for _, moe in _moe_layers(lm):
        fused = moe.experts
        seq = SequentialLlama4TextExperts(lm.config).to(fused.gate_up_proj.dtype)
        inter = fused.intermediate_size
        with torch.no_grad():
            for e, mlp in enumerate(seq):
                gu = fused.gate_up_proj[e]
                mlp.gate_proj.weight.copy_(gu[:, :inter].T)
                mlp.up_proj.weight.copy_(gu[:, inter:].T)
                mlp.down_proj.weight.copy_(fused.down_proj[e].T)
        moe.experts = seq


# ----------------------------------------------------------------------------- compressed-tensors


def _minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of w over the units that share one scale, shaped like CT's weight_scale."""
    strategy = args.strategy
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if strategy == "group":
        g = w.unflatten(-1, (-1, args.group_size))
        return g.amin(-1), g.amax(-1)
    if strategy == "block":
        br, bc = args.block_structure
        nr, nc = -(-w.shape[0] // br), -(-w.shape[1] // bc)
        mn = torch.empty(nr, nc, dtype=w.dtype)
        mx = torch.empty(nr, nc, dtype=w.dtype)
        for i in range(nr):
            for j in range(nc):
                blk = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
                mn[i, j], mx[i, j] = blk.amin(), blk.amax()
        return mn, mx
    raise ValueError(f"unsupported weight strategy {strategy}")


def _quantized_modules(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]


def _build_ct(fmt: str, model: torch.nn.Module, path: Path, group_size: int, seed: int) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    wargs, iargs, ct_format = _format_spec(fmt, group_size)
    lm, _ = _text_of(model)
    _unfuse_experts(lm)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**wargs),
        input_activations=QuantizationArgs(**iargs) if iargs else None,
    )
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=_LLMC_IGNORE),
                              show_progress=False)

    actorder = fmt == "int4-group-actorder"
    gen = torch.Generator().manual_seed(10_000 + seed)
    perms = {}
    with torch.no_grad():
        for name, m in _quantized_modules(model):
            args = m.quantization_scheme.weights
            w = m.weight.data
            if actorder:
                # quantize the column-permuted weight: group j = permuted columns [j*g, (j+1)*g)
                perm = torch.randperm(w.shape[1], generator=gen)
                perms[name] = perm
                w = w.index_select(1, perm).contiguous()
                m.weight.data = w
            mn, mx = _minmax(w, args)
            scale, zp = calculate_qparams(mn, mx, args)
            m.weight_scale.data.copy_(scale)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(zp)

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=ct_format)
    compressor.compress_model(model)

    if actorder:
        with torch.no_grad():
            for name, m in _quantized_modules(model):
                perm = perms[name]
                inv = torch.argsort(perm)
                shape = m.weight_shape.tolist()
                q_perm = unpack_from_int32(m.weight_packed.data, 4, torch.Size(shape))
                # store the codes in the original column order
                m.weight_packed.data = pack_to_int32(q_perm.index_select(1, inv).contiguous(), 4)
                g_idx = (inv // group_size).to(torch.int32)  # column c sat at permuted position inv[c]
                m.register_parameter("weight_g_idx", torch.nn.Parameter(g_idx, requires_grad=False))

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    compressor.update_config(str(path))

    if actorder:  # CT 0.20 cannot serialize actorder "group"; write it the way older CT did
        cfg = _read_config(path)
        for group in cfg["quantization_config"]["config_groups"].values():
            group["weights"]["actorder"] = "group"
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- fbgemm_fp8


def _fp8_columns(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 codes of w (float32) and float32 scales amax/448 reduced over `dim` (keepdim)."""
    amax = w.abs().amax(dim, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _build_fbgemm(model: torch.nn.Module, path: Path) -> None:
    lm, prefix = _text_of(model)
    keep = _fbgemm_not_convert(model)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, mod in lm.named_modules():
        full = prefix + name
        if isinstance(mod, Llama4TextExperts):
            gu = mod.gate_up_proj.detach().float()  # [E, H, 2I]: output columns on the last dim
            q, s = _fp8_columns(gu, 1)  # s [E, 1, 2I]
            sd[f"{full}.gate_up_proj"], sd[f"{full}.gate_up_proj_scale"] = q, s.contiguous()
            dn = mod.down_proj.detach().float()  # [E, I, H]
            q, s = _fp8_columns(dn, 1)  # s [E, 1, H]
            sd[f"{full}.down_proj"], sd[f"{full}.down_proj_scale"] = q, s.transpose(1, 2).contiguous()  # [E, H, 1]
        elif isinstance(mod, torch.nn.Linear) and should_convert_module(full, keep):
            q, s = _fp8_columns(mod.weight.detach().float(), 1)  # s [out, 1]
            sd[f"{full}.weight"], sd[f"{full}.weight_scale"] = q, s
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = _read_config(path)
    cfg["quantization_config"] = {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": FBGEMM_ACTIVATION_SCALE_UB,
        "modules_to_not_convert": keep,
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _fbgemm_not_convert(model: torch.nn.Module) -> list[str]:
    """Explicit module paths of every attention projection and router, then lm_head (the recipe of
    the CT formats); plus the vision tower's and projector's roots for multimodal models."""
    lm, prefix = _text_of(model)
    names = []
    for name, mod in lm.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or name.endswith(".router")):
            names.append(prefix + name)
    names.append(prefix + "lm_head")
    if prefix:
        names += ["vision_model", "multi_modal_projector"]
    return names


# ----------------------------------------------------------------------------- public API


def build_quantized(fmt: str, path: Path, *, variant: str = "scout", group_size: int = 32,
                    multimodal: bool = False, seed: int = 0, **overrides) -> Path:
    """Writes a tiny quantized Llama 4 checkpoint of format `fmt` (one of FORMATS) into `path`:
    config.json (with quantization_config exactly as compressed-tensors' update_config / transformers'
    FbgemmFp8Config write it), generation_config.json (what tiny_models.build writes besides the
    weights; it writes no tokenizer files: add them with tiny_tokenizer.save(path) if needed) and
    model.safetensors with the quantized tensors under their published names, shapes and dtypes.

    variant: a tiny_models.TEXT_CONFIGS key; multimodal=True writes the
    Llama4ForConditionalGeneration layout (text tensors under `language_model.`, a bf16 vision tower
    and projector, nested text_config, quantization_config at the top level). `overrides` replace
    text-config fields (like tiny_models.build); group formats round the MLP widths up to a multiple
    of group_size (module docstring). Quantized: every Linear of the text model except lm_head, the
    attention q/k/v/o projections and the routers (routed experts, shared experts, dense MLPs);
    everything else stays bf16. Returns path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (formats: {FORMATS})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = _seeded_model(variant, multimodal, seed, _text_overrides(fmt, variant, group_size, overrides))
    model.save_pretrained(path)  # config.json, generation_config.json; model.safetensors is replaced below
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    if fmt == "fbgemm-fp8":
        _build_fbgemm(model, path)
    else:
        _build_ct(fmt, model, path, group_size, seed)
    return path


def _read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _ct_match(name: str, targets: list[str]) -> bool:
    """CT's match for a module known from its tensors only: every module with a quantized weight is
    a Linear, so the class target 'Linear' matches; 're:' entries are regexes (re.match); others
    are exact module paths."""
    for t in targets:
        if t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)) or t == name:
            return True
    return False


def _ct_scheme_for(name: str, qcfg: dict) -> tuple[str, dict]:
    """(group name, group dict) of the config group that quantizes module `name`."""
    if _ct_match_ignore(name, qcfg.get("ignore") or []):
        raise ValueError(f"{name} has quantized tensors but is in the ignore list")
    for gname, group in qcfg["config_groups"].items():
        if _ct_match(name, [t for t in group["targets"] if t != "Linear"]):
            return gname, group
    for gname, group in qcfg["config_groups"].items():
        if "Linear" in group["targets"]:
            return gname, group
    raise ValueError(f"no config group of quantization_config targets {name}")


def _ct_match_ignore(name: str, ignore: list[str]) -> bool:
    return any((i.startswith("re:") and re.match(i[3:], name)) or i == name for i in ignore)


def _ct_args(args: dict | None):
    """QuantizationArgs of a config dict, without the legacy actorder 'group'/'dynamic' that CT 0.20
    refuses (returned separately: True when the weights use g_idx)."""
    from compressed_tensors.quantization import QuantizationArgs

    if args is None:
        return None, False
    args = dict(args)
    legacy = args.get("actorder") in ("group", "dynamic")
    if legacy:
        args.pop("actorder")
    return QuantizationArgs(**args), legacy


def dequantized_reference(path: Path) -> dict[str, np.ndarray]:
    """For every quantized Linear of the checkpoint at `path`: module path -> float32 [out, in]
    weight, computed in float32 (scales cast to float32 first, so the values are exactly
    (q - z) * s, resp. float(fp8) * s).

    Module paths are the checkpoint's: 'model.layers.0.feed_forward.experts.3.gate_proj',
    '...feed_forward.shared_expert.down_proj', '...feed_forward.gate_proj' (dense layers), with the
    'language_model.' prefix for multimodal checkpoints.

    compressed-tensors formats: decompressed by compressed-tensors itself
    (PackedQuantizationCompressor / FloatQuantizationCompressor.decompress with the config group's
    scheme; fp8 block weights are widened to float32 first, which is exact, since CT pads them with
    F.pad). Legacy `actorder: "group"` (weight_g_idx): CT 0.20 has no g_idx support, so the codes are
    unpacked with CT's unpack_from_int32, permuted so that each group's columns are contiguous
    (stable argsort of g_idx), dequantized with CT's group `dequantize` and permuted back:
    W[r, c] = (q[r, c] - z[r, g_idx[c]]) * s[r, g_idx[c]].
    fbgemm_fp8: fp8.float() * scale, fused experts split per expert into the same [out, in]
    per-expert names: gate_proj = gate_up_proj[e][:, :I].T, up_proj = gate_up_proj[e][:, I:].T,
    down_proj = down_proj[e].T."""
    path = Path(path)
    qcfg = _read_config(path).get("quantization_config")
    if qcfg is None:
        raise ValueError(f"{path}: config.json has no quantization_config")
    tensors = _load_tensors(path)
    if qcfg.get("quant_method") == "fbgemm_fp8":
        return _dequant_fbgemm(tensors)
    if qcfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"unsupported quant_method {qcfg.get('quant_method')!r}")
    return _dequant_ct(tensors, qcfg)


def _dequant_ct(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, np.ndarray]:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        mod, _, local_name = k.rpartition(".")
        by_module.setdefault(mod, {})[local_name] = v
    schemes = {}
    out = {}
    for name in sorted(m for m, local in by_module.items() if "weight_scale" in local):
        gname, group = _ct_scheme_for(name, qcfg)
        if gname not in schemes:
            wargs, legacy_actorder = _ct_args(group.get("weights"))
            iargs, _ = _ct_args(group.get("input_activations"))
            scheme = QuantizationScheme(targets=group["targets"], weights=wargs, input_activations=iargs)
            schemes[gname] = (scheme, legacy_actorder, group.get("format") or qcfg.get("format"))
        scheme, legacy_actorder, fmt = schemes[gname]
        wargs = scheme.weights
        local = dict(by_module[name])
        local["weight_scale"] = local["weight_scale"].to(torch.float32)
        if legacy_actorder:
            if fmt != _PACKED:
                raise ValueError(f"{name}: actorder 'group' with format {fmt}")
            g_idx = local["weight_g_idx"].long()
            shape = torch.Size(local["weight_shape"].tolist())
            q = unpack_from_int32(local["weight_packed"], wargs.num_bits, shape)
            zp = local.get("weight_zero_point")
            if zp is not None:
                zp = unpack_from_int32(zp, wargs.num_bits, (shape[0], local["weight_scale"].shape[-1]), packed_dim=0)
            counts = torch.bincount(g_idx, minlength=local["weight_scale"].shape[-1])
            if not bool((counts == wargs.group_size).all()):
                raise ValueError(f"{name}: weight_g_idx groups are not all of size {wargs.group_size}")
            perm = torch.argsort(g_idx, stable=True)
            w = dequantize(q.index_select(1, perm), local["weight_scale"], zp, wargs)
            w = w.index_select(1, torch.argsort(perm))
        else:
            if fmt == _FLOAT and wargs.strategy == "block":
                local["weight"] = local["weight"].to(torch.float32)  # exact; F.pad has no fp8 kernel
            compressor = BaseCompressor.get_value_from_registry(fmt)
            w = compressor.decompress(local, scheme)["weight"]
        if w.dtype != torch.float32:
            raise AssertionError(f"{name}: decompressed to {w.dtype}")
        out[name] = w.numpy()
    return out


def _dequant_fbgemm(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        if v.dtype != torch.float8_e4m3fn:
            continue
        if k.endswith(".experts.gate_up_proj"):
            base = k[: -len(".gate_up_proj")]
            w = v.float() * tensors[k + "_scale"].float()  # [E, H, 2I] * [E, 1, 2I]
            inter = w.shape[2] // 2
            for e in range(w.shape[0]):
                out[f"{base}.{e}.gate_proj"] = w[e, :, :inter].T.contiguous().numpy()
                out[f"{base}.{e}.up_proj"] = w[e, :, inter:].T.contiguous().numpy()
        elif k.endswith(".experts.down_proj"):
            base = k[: -len(".down_proj")]
            w = v.float() * tensors[k + "_scale"].float().transpose(1, 2)  # [E, I, H] * [E, 1, H]
            for e in range(w.shape[0]):
                out[f"{base}.{e}.down_proj"] = w[e].T.contiguous().numpy()
        elif k.endswith(".weight"):
            name = k[: -len(".weight")]
            out[name] = (v.float() * tensors[name + ".weight_scale"].float()).numpy()  # [out, in] * [out, 1]
        else:
            raise ValueError(f"unexpected fp8 tensor {k}")
    return out


# ----------------------------------------------------------------------------- reference model


def fake_quant_fp8_rows(x: torch.Tensor, group: int | None = None, ub: float | None = None) -> torch.Tensor:
    """Per-row (token) fp8 e4m3 fake quantization of x [..., K]: for each row (and, with `group`, each
    run of `group` columns; the last one may be shorter) s = min(amax, ub) / 448 and
    x_q = float(fp8(clamp(x / s, -448, 448))) * s; rows (groups) with amax 0 stay 0."""
    k = x.shape[-1]
    g = group or k
    pad = -k % g
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    xg = xp.unflatten(-1, (-1, g))
    amax = xg.abs().amax(-1, keepdim=True)
    if ub is not None:
        amax = amax.clamp(max=ub)
    nz = amax > 0
    s = torch.where(nz, amax / FP8_MAX, torch.ones_like(amax))
    q = (xg / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * s
    q = torch.where(nz, q, torch.zeros_like(q)).flatten(-2)
    return q[..., :k] if pad else q


def _act_quantizer(qcfg: dict):
    """The per-token fake-quant function of the checkpoint's dynamic input activations, or None."""
    if qcfg.get("quant_method") == "fbgemm_fp8":
        ub = float(qcfg.get("activation_scale_ub", FBGEMM_ACTIVATION_SCALE_UB))
        return lambda x: fake_quant_fp8_rows(x, ub=ub)
    quantizers = set()
    for group in qcfg["config_groups"].values():
        ia = group.get("input_activations")
        if ia is None:
            quantizers.add(None)
            continue
        if not (ia.get("type") == "float" and ia.get("num_bits") == 8 and ia.get("dynamic") is True):
            raise NotImplementedError(f"input activations {ia} (only dynamic fp8 is emulated)")
        if ia.get("strategy") == "token":
            quantizers.add(("token", None))
        elif ia.get("strategy") == "group":
            quantizers.add(("group", int(ia["group_size"])))
        else:
            raise NotImplementedError(f"input activation strategy {ia.get('strategy')} (emulated: token, group)")
    if len(quantizers) != 1:
        raise NotImplementedError(f"config groups with different activation schemes: {quantizers}")
    (q,) = quantizers
    if q is None:
        return None
    return lambda x: fake_quant_fp8_rows(x, group=q[1])


class _FakeQuantExperts(Llama4TextExperts):
    """Llama4TextExperts whose inputs (per token row of each expert, i.e. after the router score
    scaling) and down_proj inputs are fake-quantized by `self.act_quant`."""

    act_quant = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hs = self.act_quant(hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size))
        gate, up = torch.bmm(hs, self.gate_up_proj).chunk(2, dim=-1)
        mid = self.act_quant(up * self.act_fn(gate))
        return torch.bmm(mid, self.down_proj).view(-1, self.hidden_size)


def reference_model(path: Path, *, act_quant: bool, act_fn=None) -> torch.nn.Module:
    """A float32, eager-attention transformers Llama4ForCausalLM (the text model, also for
    multimodal checkpoints) whose weights are the checkpoint's: every 16-bit tensor as stored
    (upcast exactly), every quantized Linear replaced by dequantized_reference, per-expert weights
    fused back into experts.gate_up_proj [E, H, 2I] = [gate.T | up.T] and experts.down_proj
    [E, I, H] = down.T.

    act_quant=True, where the format quantizes activations dynamically, fake-quantizes the input of
    every quantized Linear, and in the routed experts the expert input (per token row, after the
    router score scaling) and the down_proj input:
    - fp8-channel-dynamic (CT input_activations fp8 strategy token): per token, s = amax / 448;
    - fp8-block (CT fp8 strategy group 128): per token and per 128-column group (one shorter group
      where K is not a multiple of 128; the tiny models have K < 128, so one group per row);
    - fbgemm-fp8: per row, s = min(amax, activation_scale_ub) / 448, x / s saturated to +-448;
    each time x_q = float(fp8_e4m3(x / s)) * s, rows with amax 0 left as 0. This is per token, NOT
    compressed-tensors' own forward, which for a 2-D input (experts and shared expert get [T, H])
    falls back to one scale for the whole tensor (quantization.md, 'Reference pitfall') and makes a
    token's result depend on its batch. For weight-only formats act_quant changes nothing, unless
    act_fn (a function of the [..., K] input) is given: it then replaces the format's quantizer at
    the same places (e.g. a runtime's documented activation quantization for integer weights)."""
    path = Path(path)
    cfg = _read_config(path)
    qcfg = cfg.get("quantization_config") or {}
    prefix = MM_PREFIX if "text_config" in cfg else ""
    tdict = dict(cfg["text_config"] if prefix else cfg)
    for k in ("quantization_config", "architectures", "auto_map"):
        tdict.pop(k, None)
    tc = Llama4TextConfig(**{k: v for k, v in tdict.items() if k != "model_type"})
    tc._attn_implementation = "eager"

    tensors = _load_tensors(path)
    deq = dequantized_reference(path)
    sd: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, w in deq.items():
        m = re.fullmatch(r"(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = torch.from_numpy(w)
        else:
            sd[name + ".weight"] = torch.from_numpy(w)
    for base, per in experts.items():
        n = len(per)
        sd[base + ".gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"].T, per[e]["up_proj"].T], 1)
                                                  for e in range(n)])
        sd[base + ".down_proj"] = torch.stack([per[e]["down_proj"].T for e in range(n)])
    consumed = set(deq) | set(experts)
    for k, v in tensors.items():
        if prefix and not k.startswith(prefix):
            continue  # vision tower, projector
        if k in sd or k.rsplit(".", 1)[0] in consumed:
            continue  # quantized module (or fused experts) already in sd
        if v.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"unexpected {v.dtype} tensor {k} outside the quantized modules")
        sd[k] = v.to(torch.float32)
    sd = {k[len(prefix) :]: v for k, v in sd.items()}

    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG state
        model = Llama4ForCausalLM(tc).to(torch.float32).eval()
    model.load_state_dict(sd, strict=True)

    aq = (act_fn or _act_quantizer(qcfg)) if act_quant and qcfg else None
    if aq is not None:
        linears = {k[len(prefix) :] for k in deq if ".feed_forward.experts." not in k}
        for name, mod in model.named_modules():
            if name in linears:
                mod.register_forward_pre_hook(lambda _m, args, f=aq: (f(args[0]),) + tuple(args[1:]))
            elif isinstance(mod, Llama4TextExperts):
                if name not in {b[len(prefix) :] for b in experts}:
                    raise AssertionError(f"{name} is not quantized but act_quant was requested")
                mod.__class__ = _FakeQuantExperts
                mod.act_quant = aq
    return model
