"""Long contexts on the CPU, measured in one run:

(a) decode attention of one global layer with Scout's head layout (40 query heads, 8 KV heads,
    head_dim 128), bf16 and fp8 KV, at 4K, 64K, 256K and 1,048,576 tokens of context: time per
    step, GB/s of K/V read, and the ratio to this machine's memory bandwidth (sampled between runs);
(b) a tiny-dims Llama 4 (chunk 8192, NoPE every 4th layer) prefilled to 131,072 tokens in 8K
    pieces (chunked prefill): time per piece as the context grows (local layers stay flat, the
    global layer grows), then time per decoded token and the process's resident memory;
(c) a 1,048,576-token sequence in the paged KV cache of a model with Scout's layer pattern (48
    layers, NoPE every 4th, chunk 8192) at tiny head sizes, filled through the KV-write kernel with
    random K/V: a decode step over all 48 layers, and the cache's memory against the formula
    (12 global layers keep every token, 36 local ones one chunk).

    python bench/long_context.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_bits, memory_bandwidth, synthetic_llama4  # noqa: E402

import corral  # noqa: E402
from corral import _core  # noqa: E402

ops = _core.ops
M = 1 << 20


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def decode_attention(threads: int, contexts: list[int], repeats: int) -> dict:
    """(a): one Scout-shaped global layer, decode row at the last position."""
    kvh, group, d, bs = 8, 5, 128, 16
    rng = np.random.default_rng(0)
    n_max = max(contexts)
    results, all_bws = {}, []
    print(f"(a) decode attention, one global layer: 40 query heads, {kvh} KV heads, head_dim {d}, block {bs}")
    print(f"{'KV':<6}{'context':>10}{'ms/step':>10}{'KV GB':>8}{'GB/s':>8}{'of bandwidth':>14}")
    for dtype in ("bfloat16", "fp8"):
        blocks = n_max // bs
        if dtype == "fp8":
            k_cache = np.empty((blocks, kvh, d, bs), np.uint8)
            v_cache = np.empty((blocks, kvh, bs, d), np.uint8)
            scales = dict(k_scale=np.empty((blocks, kvh), np.float32), v_scale=np.empty((blocks, kvh), np.float32))
            name, per_token = "float8_e4m3", 2 * kvh * d + 2 * kvh * 4 / bs
        else:
            k_cache = np.empty((blocks, kvh, d, bs), np.uint16)
            v_cache = np.empty((blocks, kvh, bs, d), np.uint16)
            scales, name, per_token = {}, "bfloat16", 2 * kvh * d * 2
        table = rng.permutation(blocks).astype(np.int32)[None]  # blocks scattered over the pool
        piece = 1 << 15
        for start in range(0, n_max, piece):  # K/V through the KV-write kernel, in pieces
            pos = np.arange(start, start + piece)
            slots = table[0, pos // bs].astype(np.int64) * bs + pos % bs
            k = rng.standard_normal((piece, kvh * d), dtype=np.float32)
            ops.kv_cache_write(k_cache, v_cache, name, k, -k, slots, **scales)
        q = rng.standard_normal((1, kvh * group, d), dtype=np.float32)
        for n in contexts:
            ts, bws = [], []
            for r in range(repeats):
                if r % 2 == 0:
                    bws.append(memory_bandwidth(threads, gib=0.5, repeats=1))
                t0 = time.perf_counter()
                ops.paged_attention(q, k_cache, v_cache, name, np.array([0, 1], np.int32), np.array([n - 1], np.int32),
                                    table[:, : n // bs], 1 / np.sqrt(d), 0, **scales)
                ts.append(time.perf_counter() - t0)
            t, bw = statistics.median(ts), statistics.median(bws)
            all_bws += bws
            kv_bytes = n * per_token
            results[(dtype, n)] = kv_bytes / t / bw
            print(f"{dtype:<6}{n:>10}{t * 1e3:>10.2f}{kv_bytes / 1e9:>8.2f}{kv_bytes / t / 1e9:>8.1f}{kv_bytes / t / bw:>14.2f}")
        del k_cache, v_cache, scales
    print(f"memory bandwidth ({threads} threads, sampled between the runs; each row: the median of its own): "
          f"median {statistics.median(all_bws) / 1e9:.1f} GB/s (min {min(all_bws) / 1e9:.1f}, "
          f"max {max(all_bws) / 1e9:.1f}, {len(all_bws)} samples)")
    return results


def chunked_prefill(tokens: int, decode: int) -> None:
    """(b): a tiny-dims model prefilled in 8K pieces."""
    with tempfile.TemporaryDirectory() as tmp:
        info = synthetic_llama4(Path(tmp), vocab=512, hidden=64, layers=4, heads=1, kv_heads=1, head_dim=32,
                                experts=4, inter=64)
        llm = corral.LLM(tmp, max_num_batched_tokens=8192, enable_prefix_caching=False)
        engine = llm._engine
        prompt = np.random.default_rng(1).integers(2, 512, size=tokens).tolist()
        print(f"\n(b) chunked prefill to {tokens:,} tokens, pieces of 8,192: a tiny model (hidden 64, 4 layers: 3 "
              f"chunked of 8,192 + 1 global NoPE; 1 head of 32), {info['params'] / 1e6:.1f}M params")
        engine.add_request(prompt, corral.SamplingParams(max_tokens=decode + 2, ignore_eos=True)._to_core())
        print(f"{'context after piece':>20}{'ms/piece':>10}")
        done = 0
        while done < tokens:
            t0 = time.perf_counter()
            engine.step()
            done = min(tokens, done + 8192)
            if done % 16384 == 0 or done == tokens:
                print(f"{done:>20,}{(time.perf_counter() - t0) * 1e3:>10.1f}")
        ts = []
        for _ in range(decode):
            t0 = time.perf_counter()
            engine.step()
            ts.append(time.perf_counter() - t0)
        stats = llm.stats()
        print(f"decode at {tokens:,} tokens: {statistics.median(ts) * 1e3:.2f} ms/token; KV blocks global "
              f"{stats['kv_global_blocks_used']}, local {stats['kv_local_blocks_used']}; resident memory "
              f"{rss_bytes() / 2**30:.2f} GiB")


def million_token_cache(threads: int, repeats: int) -> tuple[int, int, float]:
    """(c): Scout's layer pattern at tiny head sizes; returns (cache bytes, formula bytes, step ms)."""
    kvh, d, bs, chunk = 1, 64, 16, 8192
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(model_type="llama4_text", vocab_size=64, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=48, num_attention_heads=4, num_key_value_heads=kvh, head_dim=d,
                      attention_chunk_size=chunk)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        layout = _core.KvLayout.from_config(str(Path(tmp) / "config.json"), block_size=bs, dtype="bfloat16")
    before = rss_bytes()
    # No prefix caching: blocks the local layers release go straight back to the free pages.
    kv = _core.KvCache(layout, (M // bs + 1024) * layout.page_bytes * (layout.global_groups + 1), False)
    blocks = kv.blocks
    blocks.add(0, [1])
    rng = np.random.default_rng(2)
    piece = 1 << 13  # one chunk per step: local layers hold at most that chunk
    for start in range(0, M, piece):
        assert kv.append(0, piece)
        k = rng.standard_normal((piece, kvh * d), dtype=np.float32)
        kv.write(0, start, k, -k)
        if start + piece < M:
            blocks.commit(0, [7] * piece)
    # The cache as the last token's step sees it: every global block, the local blocks of its chunk.
    stats = blocks.stats()
    cache_bytes = (stats["pages_used_global"] + stats["pages_used_local"]) * layout.page_bytes
    resident = rss_bytes() - before
    per_layer_token = 2 * kvh * d * 2
    formula = per_layer_token * (12 * M + 36 * min(M, chunk))
    q = rng.standard_normal((4, d), dtype=np.float32)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for layer in range(48):
            kv.attend(0, layer, q, 0.125)
        ts.append(time.perf_counter() - t0)
    step = statistics.median(ts)
    print(f"\n(c) 1,048,576-token sequence, Scout's layer pattern (12 global + 36 chunked of {chunk}), {kvh} KV head "
          f"of {d}, bf16: cache {cache_bytes / 2**30:.3f} GiB in pages ({stats['pages_used_global']} global + "
          f"{stats['pages_used_local']} local blocks), resident growth {resident / 2**30:.3f} GiB, formula "
          f"{formula / 2**30:.3f} GiB (cache/formula {cache_bytes / formula:.4f}); decode step over 48 layers "
          f"{step * 1e3:.1f} ms ({12 * M * per_layer_token / step / 1e9:.1f} GB/s of global K/V)")
    return cache_bytes, formula, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller prefill (32K) and fewer repeats")
    args = ap.parse_args()
    _core.set_num_threads(args.threads)
    repeats = 4 if args.quick else 8
    ratios = decode_attention(args.threads, [4096, 65536, 262144, M], repeats)
    chunked_prefill(32768 if args.quick else 131072, 8)
    cache_bytes, formula, _ = million_token_cache(args.threads, 2 if args.quick else 4)
    print(f"long-context: decode_1M_bandwidth_ratio={ratios[('bfloat16', M)]:.2f} kv_bytes_1M={cache_bytes} "
          f"formula_bytes_1M={formula}")


if __name__ == "__main__":
    main()
