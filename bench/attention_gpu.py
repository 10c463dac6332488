"""Paged attention on a GPU with Scout's head layout (40 query heads, 8 KV heads, head_dim 128,
block size 16): decode of one global layer (one query row, blocks shuffled through the pool) over
4K, 64K, 256K and 1,048,576 tokens of context with bf16 and fp8 KV, and causal prefill of 8K tokens
(bf16, tensor cores).

Times corral's CUDA kernels.paged_attention on device-resident inputs
(ops.paged_attention(..., device="cuda", repeat=n): the cache, q and the batch are uploaded once per
case, then n runs are timed between two synchronisations; each run includes the op's planning and
scratch allocation). Decode: time per step, GB/s of K/V read (every visible key's K and V once, fp8
scales included), and that bandwidth as a fraction of a device-to-device copy measured in the same
run (torch, counting bytes read plus bytes written). Prefill: TFLOP/s of the causal products
(4 * heads * head_dim * sum of visible keys). Ends with one summary line.

Without a GPU (or a build without the CUDA backend) it says so and exits 0.

    python bench/attention_gpu.py [--contexts 4096,65536,262144,1048576] [--prefill 8192]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

try:
    from corral import _core
except ImportError as e:  # not installed: nothing to measure
    print(f"attention_gpu: skipped: corral is not importable ({e})")
    sys.exit(0)

ops = _core.ops

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 40, 8, 128, 16


def tiled(rng, n, dtype, make, block=1 << 22):
    """n elements of `dtype` from one random block of `make(rng, block)` repeated: fast for GBs."""
    tile = make(rng, block).astype(dtype)
    out = np.empty(n, dtype)
    for i in range(0, n, block):
        m = min(block, n - i)
        out[i : i + m] = tile[:m]
    return out


def bf16_values(rng, k):
    """bf16 bit patterns of N(0, 1) values."""
    u = rng.standard_normal(k, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def fp8_codes(rng, k):
    """Random finite e4m3 codes of magnitude below 2 (exponent field < 8), random signs."""
    return (rng.integers(0, 64, k) | (rng.integers(0, 2, k) << 7)).astype(np.uint8)


def make_cache(rng, tokens, dtype):
    blocks = -(-tokens // BLOCK)
    n = blocks * KV_HEADS * HEAD_DIM * BLOCK
    if dtype == "bfloat16":
        k = tiled(rng, n, np.uint16, bf16_values).reshape(blocks, KV_HEADS, HEAD_DIM, BLOCK)
        v = tiled(rng, n, np.uint16, bf16_values).reshape(blocks, KV_HEADS, BLOCK, HEAD_DIM)
        return k, v, {}
    k = tiled(rng, n, np.uint8, fp8_codes).reshape(blocks, KV_HEADS, HEAD_DIM, BLOCK)
    v = tiled(rng, n, np.uint8, fp8_codes).reshape(blocks, KV_HEADS, BLOCK, HEAD_DIM)
    scales = {"k_scale": np.full((blocks, KV_HEADS), 0.25, np.float32),
              "v_scale": np.full((blocks, KV_HEADS), 0.5, np.float32)}
    return k, v, scales


def copy_bandwidth() -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second), best of a few, via torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = 1 << 29  # 2 GiB of float32 each way
    x = torch.empty(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    best = 0.0
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        start.record()
        for _ in range(4):
            y.copy_(x)
        stop.record()
        stop.synchronize()
        best = max(best, 4 * 2 * x.numel() * 4 / (start.elapsed_time(stop) / 1e3))
    del x, y
    torch.cuda.empty_cache()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="4096,65536,262144,1048576")
    ap.add_argument("--dtypes", default="bfloat16,float8_e4m3")
    ap.add_argument("--prefill", type=int, default=8192, help="causal prefill length (0: none)")
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop adding cases after this long")
    args = ap.parse_args()
    start = time.perf_counter()

    if not _core.cuda_backend_built():
        print("attention_gpu: skipped: this build of corral has no CUDA backend")
        return
    if _core.cuda_device_count() == 0:
        print(f"attention_gpu: skipped: no usable CUDA device ({_core.cuda_status()})")
        return

    copy_bw = copy_bandwidth()
    if copy_bw is None:
        print("attention_gpu: torch with CUDA is not available: no copy-bandwidth ratio")
    else:
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")

    rng = np.random.default_rng(0)
    scale = 1.0 / np.sqrt(HEAD_DIM)
    rows = []
    for dtype in args.dtypes.split(","):
        for ctx in [int(c) for c in args.contexts.split(",")]:
            if time.perf_counter() - start > args.budget_s:
                print(f"attention_gpu: time budget spent, {dtype} {ctx} and beyond not measured")
                break
            t0 = time.perf_counter()
            k, v, scales = make_cache(rng, ctx, dtype)
            table = rng.permutation(k.shape[0]).astype(np.int32)[None]
            q = rng.standard_normal((1, HEADS, HEAD_DIM)).astype(np.float32)
            repeat = 200 if ctx <= 65536 else 50 if ctx <= 262144 else 20
            out, seconds = ops.paged_attention(q, k, v, dtype, np.array([0, 1], np.int32),
                                               np.array([ctx - 1], np.int32), table, scale, 0, device="cuda",
                                               repeat=repeat, **scales)
            if not np.all(np.isfinite(out)):
                print(f"attention_gpu: {dtype} {ctx}: non-finite output")
                sys.exit(1)
            es = 2 if dtype == "bfloat16" else 1
            kv_bytes = 2 * ctx * KV_HEADS * HEAD_DIM * es + (0 if es == 2 else 2 * k.shape[0] * KV_HEADS * 4)
            rows.append((dtype, ctx, seconds, kv_bytes))
            print(f"  decode {dtype} {ctx}: {repeat} runs (case {time.perf_counter() - t0:.1f} s)", flush=True)
            del k, v, scales

    prefill = None
    if args.prefill > 0 and time.perf_counter() - start < args.budget_s + 15:
        n = args.prefill
        k, v, _ = make_cache(rng, n, "bfloat16")
        table = np.arange(k.shape[0], dtype=np.int32)[None]
        q = rng.standard_normal((n, HEADS, HEAD_DIM)).astype(np.float32)
        out, seconds = ops.paged_attention(q, k, v, "bfloat16", np.array([0, n], np.int32),
                                           np.arange(n, dtype=np.int32), table, scale, 0, device="cuda", repeat=5)
        if not np.all(np.isfinite(out)):
            print("attention_gpu: prefill: non-finite output")
            sys.exit(1)
        flops = 4.0 * HEADS * HEAD_DIM * (n * (n + 1) / 2)
        prefill = (n, seconds, flops)

    print(f"{'kv':>12}{'context':>10}{'step us':>10}{'KV GB':>8}{'GB/s':>8}{'of copy':>9}")
    for dtype, ctx, t, b in rows:
        ratio = f"{b / t / copy_bw:8.2f}" if copy_bw else "       -"
        print(f"{dtype:>12}{ctx:>10}{t * 1e6:>10.1f}{b / 1e9:>8.3f}{b / t / 1e9:>8.0f} {ratio}")
    if prefill:
        n, t, f = prefill
        print(f"prefill bf16 causal {n} tokens: {t * 1e3:.2f} ms, {f / t / 1e12:.1f} TFLOP/s")
    summary = " ".join(f"{'bf16' if d == 'bfloat16' else 'fp8'}_{c // 1024}K_us={t * 1e6:.0f}"
                       f"_GBps={b / t / 1e9:.0f}" + (f"_copy={b / t / copy_bw:.2f}" if copy_bw else "")
                       for d, c, t, b in rows)
    if prefill:
        summary += f" prefill{prefill[0] // 1024}K_TFLOPs={prefill[2] / prefill[1] / 1e12:.1f}"
    print(f"attention_gpu: {summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
