"""End-to-end CPU speed on a synthetic Llama 4 MoE (random bf16 weights, Scout's layout scaled
down): prefill and batch-1 decode tokens/s of Corral and of transformers, side by side in one run,
with decode read as a fraction of this machine's memory bandwidth (measured here, same threads).

    python bench/decode.py [--threads 2] [--prefill 256] [--decode 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import memory_bandwidth, synthetic_llama4  # noqa: E402

SHAPE = dict(vocab=32768, hidden=1024, layers=8, heads=8, kv_heads=2, head_dim=128, experts=16, inter=1024)


def time_corral(path, prompt, decode, threads):
    import corral

    llm = corral.LLM(path, num_threads=threads, max_num_batched_tokens=len(prompt))
    llm.logits(prompt[:16])  # warm up
    t0 = time.perf_counter()
    llm.logits(prompt)
    prefill = time.perf_counter() - t0

    def generate(n):
        t0 = time.perf_counter()
        out = llm.generate([prompt[:8]], corral.SamplingParams(max_tokens=n, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - t0

    # Decode steps only: the run of n tokens minus the run of 1 (prefill and first token).
    return len(prompt) / prefill, (decode - 1) / (generate(decode) - generate(1))


def time_transformers(path, prompt, decode, threads):
    import torch
    from transformers import Llama4ForCausalLM

    torch.set_num_threads(threads)
    model = Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :16])
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0

        def generate(n):
            t0 = time.perf_counter()
            model.generate(ids[:, :8], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

        return len(prompt) / prefill, (decode - 1) / (generate(decode) - generate(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (A, B, A, B, ...); medians reported")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        info = synthetic_llama4(Path(tmp), **SHAPE)
        print(f"model: {SHAPE}, {info['params'] / 1e6:.0f}M params, {info['decode_bytes'] / 1e6:.1f} MB read per decoded token")
        prompt = np.random.default_rng(0).integers(2, SHAPE["vocab"], size=args.prefill).tolist()
        runs = {"corral": [], "transformers": []}
        bandwidth = []
        for _ in range(args.rounds):
            bandwidth.append(memory_bandwidth(args.threads))
            runs["corral"].append(time_corral(tmp, prompt, args.decode, args.threads))
            runs["transformers"].append(time_transformers(tmp, prompt, args.decode, args.threads))
        bw = statistics.median(bandwidth)
        floor = bw / info["decode_bytes"]
        print(f"memory bandwidth ({args.threads} threads): {bw / 1e9:.1f} GB/s -> decode floor {floor:.0f} tok/s")
        print(f"{'engine':<14}{'prefill tok/s':>14}{'decode tok/s':>14}{'of floor':>10}")
        med = {}
        for name, r in runs.items():
            pre, dec = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
            med[name] = (pre, dec)
            print(f"{name:<14}{pre:>14.1f}{dec:>14.1f}{dec / floor:>10.2f}")
        c, t = med["corral"], med["transformers"]
        print(f"decode: corral_tok_s={c[1]:.1f} transformers_tok_s={t[1]:.1f} speedup={c[1] / t[1]:.2f} "
              f"bandwidth_ratio={c[1] / floor:.2f} prefill_speedup={c[0] / t[0]:.2f}")


if __name__ == "__main__":
    main()
