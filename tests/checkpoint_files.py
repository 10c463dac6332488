"""Helpers for test_checkpoint.py: tiny Llama 4 checkpoints built with transformers, and
byte-level reading, editing and writing of config.json, safetensors files and shard indexes.

The safetensors helpers work on raw bytes, so they keep any dtype (BF16, F8, ...) as stored and
can write files the safetensors library never would (corrupt ones included).
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np

from tiny_models import VISION_CONFIG, reference_logits

# The tiny text model of every test. 4 layers, so that layer 3 is a NoPE layer (with attention
# temperature tuning) under the default no_rope_layer_interval of 4; layers 1 and 3 are MoE.
# initializer_range is large so that RoPE, temperature tuning and chunking visibly change the
# logits (with transformers' default 0.02 attention is nearly uniform).
TEXT_KW = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=16,
    intermediate_size_mlp=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    interleave_moe_layer_step=2,
    attention_chunk_size=4,
    floor_scale=2,
    initializer_range=0.3,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
)

# Prompt of every logits comparison: 12 tokens cover 3 attention chunks of 4 and several
# temperature-tuning steps (floor_scale 2).
TOKENS = [1, 5, 9, 3, 7, 2, 11, 13, 17, 19, 23, 63]

# Required fields of the text config.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Element sizes of the safetensors dtypes used here.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
    "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
}


def text_kwargs(**overrides) -> dict:
    kw = copy.deepcopy(TEXT_KW)
    kw.update(overrides)
    return kw


# ----------------------------------------------------------------------------- transformers models


def build_causal(seed: int = 0, **overrides):
    """A seeded Llama4ForCausalLM in eval mode."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    return Llama4ForCausalLM(Llama4TextConfig(**text_kwargs(**overrides))).eval()


def build_conditional(seed: int = 0, **text_overrides):
    """A seeded Llama4ForConditionalGeneration (text + vision) in eval mode."""
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Llama4Config(text_config=text_kwargs(**text_overrides), vision_config=dict(VISION_CONFIG))
    return Llama4ForConditionalGeneration(cfg).eval()


def causal_like(state_dict, **overrides):
    """A Llama4ForCausalLM with config TEXT_KW + overrides and the given (text-model) weights, float32."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    m = Llama4ForCausalLM(Llama4TextConfig(**text_kwargs(**overrides))).eval()
    m.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    return m


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    """Float32 logits (len, vocab) of a transformers Llama 4 model on a prompt of token ids."""
    return reference_logits(model, list(tokens)).astype(np.float32)


# ----------------------------------------------------------------------------- folders and config


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def write_config(folder: Path, cfg: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=1))


def text_section(cfg: dict) -> dict:
    """The dict holding the text config's fields (the nested text_config when there is one)."""
    return cfg["text_config"] if "text_config" in cfg else cfg


def edit_text_config(folder: Path, **changes) -> dict:
    """Sets (or, for the value DELETE, removes) fields of the text config; returns the new config."""
    cfg = read_config(folder)
    t = text_section(cfg)
    for k, v in changes.items():
        if v is DELETE:
            t.pop(k, None)
        else:
            t[k] = v
    write_config(folder, cfg)
    return cfg


class _Delete:
    def __repr__(self):
        return "DELETE"


DELETE = _Delete()


# ----------------------------------------------------------------------------- raw safetensors


class Tensor:
    """One tensor of a safetensors file as stored: dtype string, shape, raw bytes."""

    def __init__(self, dtype: str, shape, data: bytes):
        self.dtype = dtype
        self.shape = [int(s) for s in shape]
        self.data = bytes(data)

    @classmethod
    def from_array(cls, a: np.ndarray, dtype: str | None = None) -> "Tensor":
        names = {np.float64: "F64", np.float32: "F32", np.float16: "F16", np.int64: "I64", np.int32: "I32",
                 np.int16: "I16", np.int8: "I8", np.uint8: "U8", np.bool_: "BOOL", np.complex64: "C64"}
        a = np.ascontiguousarray(a)
        return cls(dtype or names[a.dtype.type], a.shape, a.tobytes())

    def array(self) -> np.ndarray:
        """The values as a numpy array (F32/F16/F64 as is, BF16 widened to float32)."""
        if self.dtype == "BF16":
            bits = np.frombuffer(self.data, dtype=np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        dt = {"F32": np.float32, "F16": np.float16, "F64": np.float64}[self.dtype]
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape)

    @classmethod
    def bf16(cls, a: np.ndarray) -> "Tensor":
        """float32 values rounded (to nearest even) to a BF16 tensor."""
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return cls("BF16", np.shape(a), bits.tobytes())

    def copy(self) -> "Tensor":
        return Tensor(self.dtype, list(self.shape), self.data)


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    """(tensors by name in file order, __metadata__) of a well-formed safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        tensors[name] = Tensor(e["dtype"], e["shape"], data[b:end])
    return tensors, meta


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict | None = None, *, align: int = 8,
                      extra_header_bytes: int = 0, entry_overrides: dict | None = None) -> bytes:
    """A safetensors file holding `tensors` in order. The header is padded with spaces to a
    multiple of `align` bytes (the safetensors library uses 8), plus `extra_header_bytes` more.
    entry_overrides {name: {key: value}} replaces header fields (dtype, shape, data_offsets) as
    written, without touching the data: the way to write inconsistent headers."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    chunks = []
    for name, t in tensors.items():
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(t.data)]}
        offset += len(t.data)
        chunks.append(t.data)
    for name, fields in (entry_overrides or {}).items():
        header.setdefault(name, {}).update(fields)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % align + extra_header_bytes)
    return struct.pack("<Q", len(h)) + h + b"".join(chunks)


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict | None = None, **kw) -> None:
    Path(path).write_bytes(safetensors_bytes(tensors, metadata, **kw))


def edit_safetensors(path: Path, fn) -> None:
    """Rewrites a safetensors file after fn(tensors) edits the dict of Tensors in place."""
    tensors, meta = read_safetensors(path)
    fn(tensors)
    write_safetensors(path, tensors, meta)


def tensor_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def file_of(folder: Path, name: str) -> Path:
    """The safetensors file of a checkpoint folder that holds tensor `name`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def edit_tensor(folder: Path, name: str, fn) -> None:
    """Replaces tensor `name` (single-file or sharded checkpoint) by fn(Tensor) -> Tensor, or deletes
    it from its file when fn returns None (the index, if any, is left as it was)."""

    def edit(tensors):
        new = fn(tensors[name])
        if new is None:
            del tensors[name]
        else:
            tensors[name] = new

    edit_safetensors(file_of(folder, name), edit)


def shard(folder: Path, num_shards: int = 3) -> dict[str, str]:
    """Splits the folder's model.safetensors into `num_shards` files named like transformers'
    (model-00001-of-00003.safetensors, ...), writes model.safetensors.index.json and removes the
    single file. Returns the weight map."""
    folder = Path(folder)
    tensors, meta = read_safetensors(folder / "model.safetensors")
    names = list(tensors)
    weight_map: dict[str, str] = {}
    per = -(-len(names) // num_shards)
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        write_safetensors(folder / fname, part, meta)
        weight_map.update({n: fname for n in part})
    total = sum(len(t.data) for t in tensors.values())
    write_index(folder, weight_map, {"total_size": total})
    (folder / "model.safetensors").unlink()
    return weight_map


def read_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model.safetensors.index.json").read_text())


def write_index(folder: Path, weight_map: dict, metadata: dict | None = None) -> None:
    body = {"metadata": metadata or {}, "weight_map": weight_map}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(body, indent=1))
