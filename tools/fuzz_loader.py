"""Fuzz target of the checkpoint loader (atheris; tools/fuzz_loader.sh sets it up and runs it).

Each input is a checkpoint folder framed as records: one byte picking a file name of NAMES, a
4-byte little-endian length, then that many bytes of the file (a later record of the same name
replaces the earlier). The folder is loaded with corral.LLM and, when that succeeds, run for one
token: only corral.CorralError subclasses may come out. Any other exception, a crash or a
sanitizer report (under tools/fuzz_loader.sh: the sanitized build) is a finding.

    python tools/fuzz_loader.py --make-seeds DIR   # tiny real checkpoints, framed, and DIR.dict
    python tools/fuzz_loader.py CORPUS SEEDS -dict=SEEDS.dict ...   # libFuzzer flags
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris
import numpy  # noqa: F401  (imported before the instrumented modules: only corral's code is)

with atheris.instrument_imports(include=["corral"]):
    import corral

NAMES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
)


def encode(files: dict[str, bytes]) -> bytes:
    return b"".join(bytes([NAMES.index(n)]) + struct.pack("<I", len(b)) + b for n, b in files.items())


def decode(data: bytes) -> dict[str, bytes]:
    files = {}
    i = 0
    while i < len(data):
        name = NAMES[data[i] % len(NAMES)]
        (n,) = struct.unpack("<I", data[i + 1 : i + 5].ljust(4, b"\0"))
        files[name] = data[i + 5 : i + 5 + n]
        i += 5 + n
    return files


# The folder each input is written to (tools/fuzz_loader.sh names one it cleans up).
FOLDER = Path(os.environ.get("CORRAL_FUZZ_FOLDER") or tempfile.mkdtemp(prefix="corral-fuzz-"))
FOLDER.mkdir(parents=True, exist_ok=True)


def test_one_input(data: bytes) -> None:
    for f in FOLDER.iterdir():
        f.unlink()
    for name, content in decode(data).items():
        (FOLDER / name).write_bytes(content)
    try:
        llm = corral.LLM(FOLDER, skip_tokenizer_init=True, kv_cache_bytes=1 << 20, num_threads=1)
        llm.logits([0])
    except corral.CorralError:
        pass


def make_seeds(out: Path) -> None:
    """Writes framed tiny checkpoints (tests/checkpoint_files.py, tests/quant_fixtures.py) into
    `out`, and a libFuzzer dictionary of every JSON key and string in them to `out`.dict."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from checkpoint_files import build_causal, build_conditional, shard
    from quant_fixtures import build_quantized

    out.mkdir(parents=True, exist_ok=True)
    small = dict(num_hidden_layers=2)
    builders = {
        "causal-f32": lambda p: build_causal(**small).save_pretrained(p),
        "causal-bf16": lambda p: build_causal(**small).to(torch.bfloat16).save_pretrained(p),
        "conditional-bf16": lambda p: build_conditional(**small).to(torch.bfloat16).save_pretrained(p),
        "sharded": lambda p: (build_causal(**small).save_pretrained(p), shard(p, 2)),
    }
    for fmt in ("int4-group-asym", "int8-channel-sym", "fp8-block", "fbgemm-fp8"):
        builders[fmt] = lambda p, fmt=fmt: build_quantized(fmt, p, num_hidden_layers=1, num_local_experts=2)
    tokens: set[str] = set()

    def strings(v):
        if isinstance(v, dict):
            for k, x in v.items():
                tokens.add(k)
                strings(x)
        elif isinstance(v, list):
            for x in v:
                strings(x)
        elif isinstance(v, str):
            tokens.add(v)

    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders.items():
            path = Path(tmp) / name
            build(path)
            files = {n: (path / n).read_bytes() for n in NAMES if (path / n).exists()}
            (out / name).write_bytes(encode(files))
            for n, b in files.items():
                if n.endswith(".json"):
                    strings(json.loads(b))
                else:
                    (length,) = struct.unpack("<Q", b[:8])
                    strings(json.loads(b[8 : 8 + length]))
    with open(f"{out}.dict", "w") as d:
        for t in sorted(tokens):
            if t.isascii() and t.isprintable() and len(t) < 64:
                d.write(json.dumps(json.dumps(t)) + "\n")  # the JSON string, quoted for libFuzzer


def main() -> None:
    if sys.argv[1:2] == ["--make-seeds"]:
        make_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
