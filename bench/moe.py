"""Fused MoE on the CPU against its alternatives, measured side by side in one run.

A Maverick-shaped MoE layer (128 experts, top-1, a shared expert) scaled down to fit this machine,
bf16 weights, several copies of the layer rotated between calls so that caches do not hold the
weights (as in a model, where the other layers' weights flush them). For each token count T:
- fused: corral's kernels.moe (one op: router, permutation, grouped gate/up with SwiGLU, down,
  combine with the shared expert);
- naive: a per-expert loop in Python over corral's own linear and silu_mul kernels;
- transformers: Llama4TextMoe in torch bf16, same thread count (it runs every expert on every
  token, so it is timed only up to --hf-max-tokens).
Per row: median time, bytes of weights read (router + the experts the tokens pick + the shared
expert), GB/s, GFLOP/s of the routed work, and GB/s over this machine's memory bandwidth measured in
the same run.

    python bench/moe.py [--threads 2] [--hidden 2048] [--inter 1536] [--experts 128] [--layers 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import memory_bandwidth  # noqa: E402

from corral import _core  # noqa: E402

ops = _core.ops
TOKENS = (1, 4, 16, 64, 256, 1024)


def random_bf16(rng, shape):
    """Random normal-range bf16 bit patterns (|w| about 2^-7 .. 2^-4) without a float32 detour."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return (bits & 0x807F) | (np.uint16(120 << 7) + ((bits >> 7) & 3).astype(np.uint16) * np.uint16(1 << 7))


def make_layer(rng, E, H, I):
    """The layer's arrays, and its weights packed once as a model packs them at load: for the fused
    op, and matrix by matrix for the loop."""
    a = dict(
        router=random_bf16(rng, (E, H)), gate_up=random_bf16(rng, (E, H, 2 * I)), down=random_bf16(rng, (E, I, H)),
        shared_gate=random_bf16(rng, (I, H)), shared_up=random_bf16(rng, (I, H)), shared_down=random_bf16(rng, (H, I)),
    )
    a["packed"] = ops.pack_moe(a["router"], a["gate_up"], a["down"], a["shared_gate"], a["shared_up"],
                               a["shared_down"], "bfloat16")
    a["matrices"] = {name: ops.pack_linear(a[name], "bfloat16") for name in ("router", "shared_gate", "shared_up",
                                                                             "shared_down")}
    a["matrices"]["gate"] = [ops.pack_linear(np.ascontiguousarray(w[:, :I]), "bfloat16", "in_out") for w in a["gate_up"]]
    a["matrices"]["up"] = [ops.pack_linear(np.ascontiguousarray(w[:, I:]), "bfloat16", "in_out") for w in a["gate_up"]]
    a["matrices"]["down"] = [ops.pack_linear(w, "bfloat16", "in_out") for w in a["down"]]
    return a


def drop_arrays(layer):
    """Frees a layer's expert arrays once packed (the packed copies are what the kernels read)."""
    for name in ("gate_up", "down"):
        layer.pop(name)


def fused(layer, x, top_k):
    return ops.moe_packed(x, layer["packed"], top_k)[0]


def naive(layer, x, top_k):
    """Llama 4's MoE as a loop over experts, from corral's linear and silu_mul kernels."""
    m = layer["matrices"]
    logits = ops.linear_packed(x, m["router"], "float32")  # the router reads x exactly, as in the fused op
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    scores = 1 / (1 + np.exp(-np.take_along_axis(logits, chosen, 1)))
    out = ops.linear_packed(ops.silu_mul(ops.linear_packed(x, m["shared_gate"]), ops.linear_packed(x, m["shared_up"])),
                            m["shared_down"])
    for e in np.unique(chosen):
        rows, ks = np.nonzero(chosen == e)
        xs = np.ascontiguousarray(x[rows] * scores[rows, ks][:, None], dtype=np.float32)
        h = ops.silu_mul(ops.linear_packed(xs, m["gate"][e]), ops.linear_packed(xs, m["up"][e]))
        np.add.at(out, rows, ops.linear_packed(h, m["down"][e]))
    return out


def transformers_moe(layer, E, H, I, top_k, threads):
    import torch
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    torch.set_num_threads(threads)
    cfg = Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=top_k)
    moe = Llama4TextMoe(cfg).to(torch.bfloat16).eval()
    as_bf16 = lambda a: torch.from_numpy(a).view(torch.bfloat16)  # noqa: E731  (no copy)
    moe.router.weight.data = as_bf16(layer["router"])
    moe.experts.gate_up_proj.data = as_bf16(layer["gate_up"])
    moe.experts.down_proj.data = as_bf16(layer["down"])
    moe.shared_expert.gate_proj.weight.data = as_bf16(layer["shared_gate"])
    moe.shared_expert.up_proj.weight.data = as_bf16(layer["shared_up"])
    moe.shared_expert.down_proj.weight.data = as_bf16(layer["shared_down"])

    def run(x):
        with torch.no_grad():
            return moe(torch.from_numpy(x).to(torch.bfloat16))[0]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2, help="copies of the layer, rotated between calls")
    ap.add_argument("--hf-max-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per variant and T")
    ap.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS), help="token counts to run")
    ap.add_argument("--burst", type=int, default=3, help="calls timed back to back per variant and round")
    args = ap.parse_args()
    E, H, I, k = args.experts, args.hidden, args.inter, args.top_k
    _core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = [make_layer(rng, E, H, I) for _ in range(args.layers)]
    for layer in layers[1:]:  # transformers reads layer 0's arrays
        drop_arrays(layer)
    print(f"shapes: hidden {H}, expert width {I}, {E} experts, top-{k}, shared expert; bf16; {args.layers} layers "
          f"of {sum(a.nbytes for a in layers[0].values() if isinstance(a, np.ndarray)) / 1e9:.2f} GB rotated; {args.threads} threads")
    hf = transformers_moe(layers[0], E, H, I, k, args.threads)
    expert_bytes = 3 * H * I * 2

    rows, result = [], {}
    bandwidth = []
    for T in args.tokens:
        xs = [rng.standard_normal((T, H), dtype=np.float32) for _ in range(4)]
        variants = {"fused": fused, "naive": naive}
        if T <= args.hf_max_tokens:
            variants["transformers"] = lambda layer, x, top_k: hf(x)
        times = {name: [] for name in variants}
        deadline = time.perf_counter() + args.seconds * len(variants)
        i = 0
        while i < 3 or (time.perf_counter() < deadline and i < 100):
            if i % 4 == 0:  # the machine's bandwidth drifts: sample it between the variants too
                bandwidth.append(memory_bandwidth(args.threads, gib=0.5, repeats=1))
            for name, fn in variants.items():  # interleaved: A, B, C, A, B, C, ...
                if name == "transformers" and i >= 5:
                    continue
                # A burst of calls back to back, as in a model's forward pass (worker threads awake);
                # the first of each burst wakes them and is not counted.
                for b in range(args.burst + 1):
                    layer = layers[(i + b) % len(layers)] if name != "transformers" else layers[0]
                    x = xs[(i + b) % len(xs)]
                    t0 = time.perf_counter()
                    fn(layer, x, k)
                    if b:
                        times[name].append(time.perf_counter() - t0)
                time.sleep(0.02)  # let this variant's spinning worker threads go idle
            i += 1
        # Bytes: router, each distinct expert the tokens pick, and the shared expert.
        logits = xs[0] @ layers[0]["router"].astype(np.uint32).__lshift__(16).view(np.float32).T
        active = len(np.unique(np.argsort(-logits, axis=1)[:, :k]))
        weight_bytes = E * H * 2 + (active + 1) * expert_bytes
        flops = 2 * T * H * E + 2 * 3 * H * I * T * (k + 1)
        for name, ts in times.items():
            t = statistics.median(ts)
            result[(name, T)] = t
            rows.append((T, name, t, weight_bytes, flops))
    bw = statistics.median(bandwidth)
    print(f"memory bandwidth ({args.threads} threads, measured between the runs): median {bw / 1e9:.1f} GB/s "
          f"(min {min(bandwidth) / 1e9:.1f}, max {max(bandwidth) / 1e9:.1f}, {len(bandwidth)} samples)")
    print(f"{'T':>5} {'variant':<13}{'time ms':>10}{'weights MB':>12}{'GB/s':>8}{'GFLOP/s':>9}{'of bandwidth':>14}")
    for T, name, t, b, f in rows:
        print(f"{T:>5} {name:<13}{t * 1e3:>10.3f}{b / 1e6:>12.1f}{b / t / 1e9:>8.1f}{f / t / 1e9:>9.1f}{b / t / bw:>14.2f}")
    if 1 in args.tokens and 1024 in args.tokens:
        t1 = result[("fused", 1)]
        print(f"moe: T1_bandwidth_ratio={rows[0][3] / t1 / bw:.2f} "
              f"T1_speedup_vs_transformers={result[('transformers', 1)] / t1:.1f} "
              f"T1024_speedup_vs_naive={result[('naive', 1024)] / result[('fused', 1024)]:.2f}")


if __name__ == "__main__":
    main()
