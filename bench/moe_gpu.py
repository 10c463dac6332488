"""The fused MoE op on a GPU: a Maverick-shaped layer (hidden 5120, inter 8192, 128 experts, top-1,
a shared expert of the same width), bf16 weights, at T = 1, 16, 256 and 4096 tokens.

Times corral's CUDA kernels.moe on device-resident inputs (ops.moe(..., device="cuda", repeat=n):
the inputs are uploaded once per token count, then n runs are timed between two synchronisations;
each run includes the op's scratch allocation). Per row: time per call, bytes of weights read
(router + each expert the tokens pick + the shared expert, each once), GB/s over those bytes, and
TFLOP/s of the routed and shared products. Ends with one summary line.

Without a GPU (or a build without the CUDA backend) it says so and exits 0. With too little GPU or
host memory for 128 experts it halves the expert count until the layer fits.

    python bench/moe_gpu.py [--experts 128] [--hidden 5120] [--inter 8192] [--top-k 1] [--tokens 1,16,256,4096]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

try:
    from corral import _core
except ImportError as e:  # not installed: nothing to measure
    print(f"moe_gpu: skipped: corral is not importable ({e})")
    sys.exit(0)

ops = _core.ops


def gpu_free_bytes() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        return int(out.stdout.split()[0]) * 2**20 if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def host_free_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def bf16_array(rng, shape, block=1 << 22):
    """bf16 bit patterns of random values of magnitude about 2^-7 .. 2^-4 (random signs), written
    by tiling one random block: fast even for tens of GB."""
    bits = rng.integers(0, 1 << 16, size=block, dtype=np.uint16)
    tile = (bits & 0x807F) | (np.uint16(120 << 7) + ((bits >> 7) & 3).astype(np.uint16) * np.uint16(1 << 7))
    out = np.empty(int(np.prod(shape)), np.uint16)
    for i in range(0, out.size, block):
        n = min(block, out.size - i)
        out[i : i + n] = tile[:n]
    return out.reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--budget-s", type=float, default=75.0, help="stop adding token counts after this long")
    args = ap.parse_args()
    start = time.perf_counter()

    if not _core.cuda_backend_built():
        print("moe_gpu: skipped: this build of corral has no CUDA backend")
        return
    if _core.cuda_device_count() == 0:
        print(f"moe_gpu: skipped: no usable CUDA device ({_core.cuda_status()})")
        return

    E, H, I, k = args.experts, args.hidden, args.inter, args.top_k
    tokens = [int(t) for t in args.tokens.split(",")]
    expert_bytes = 3 * H * I * 2

    def layer_bytes(e):
        return e * H * 2 + (e + 1) * expert_bytes

    # Device: the layer plus scratch of the largest T (activations, hidden rows, outputs) and slack.
    scratch = max(tokens) * (k + 1) * (H * 2 + I * 2 + H * 4) + 4 * max(tokens) * H * 4 + 2**30
    gpu_free, host_free = gpu_free_bytes(), host_free_bytes()
    while E > 1 and ((gpu_free is not None and layer_bytes(E) + scratch > 0.9 * gpu_free) or
                     (host_free is not None and layer_bytes(E) > 0.6 * host_free)):
        E //= 2
    if E != args.experts:
        print(f"moe_gpu: {args.experts} experts do not fit (GPU free {gpu_free}, host free {host_free} bytes): "
              f"using {E}")
    k = min(k, E)

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    layer = dict(router=bf16_array(rng, (E, H)), gate_up=bf16_array(rng, (E, H, 2 * I)),
                 down=bf16_array(rng, (E, I, H)), shared_gate=bf16_array(rng, (I, H)),
                 shared_up=bf16_array(rng, (I, H)), shared_down=bf16_array(rng, (H, I)))
    print(f"layer: E={E} H={H} I={I} top_k={k} bf16, {layer_bytes(E) / 1e9:.1f} GB of weights "
          f"(made in {time.perf_counter() - t0:.1f} s)")
    names = ("router", "gate_up", "down", "shared_gate", "shared_up", "shared_down")

    rows = []
    for T in tokens:
        if time.perf_counter() - start > args.budget_s:
            print(f"moe_gpu: time budget spent, T={T} and beyond not measured")
            break
        x = rng.standard_normal((T, H)).astype(np.float32)
        repeat = 50 if T <= 16 else 20 if T <= 256 else 5
        t0 = time.perf_counter()
        out, counts, seconds = ops.moe(x, *[layer[n] for n in names], k, "bfloat16", device="cuda", repeat=repeat)
        wall = time.perf_counter() - t0
        if not np.all(np.isfinite(out)) or counts.sum() != T * k:
            print(f"moe_gpu: T={T}: bad result (finite: {np.all(np.isfinite(out))}, counts sum {counts.sum()})")
            sys.exit(1)
        active = int(np.count_nonzero(counts))
        weight_bytes = E * H * 2 + (active + 1) * expert_bytes
        flops = 2 * T * H * E + 2 * 3 * H * I * T * (k + 1)
        rows.append((T, active, seconds, weight_bytes, flops))
        print(f"  T={T}: {repeat} runs, call with upload {wall:.1f} s", flush=True)

    print(f"{'T':>5}{'experts used':>14}{'time ms':>10}{'weights GB':>12}{'GB/s':>9}{'TFLOP/s':>9}")
    for T, active, t, b, f in rows:
        print(f"{T:>5}{active:>14}{t * 1e3:>10.3f}{b / 1e9:>12.2f}{b / t / 1e9:>9.0f}{f / t / 1e12:>9.1f}")
    summary = " ".join(f"T{T}_ms={t * 1e3:.3f} T{T}_GBps={b / t / 1e9:.0f} T{T}_TFLOPs={f / t / 1e12:.1f}"
                       for T, _, t, b, f in rows)
    print(f"moe_gpu: E={E} {summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
