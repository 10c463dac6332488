"""Shared pieces of the benchmarks: this machine's memory bandwidth, measured in the same run,
and a synthetic Llama 4 checkpoint written straight from numpy."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np


def memory_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: `threads` threads each taking the max of a disjoint part of an
    array far beyond the last-level cache (a SIMD max is bound by memory, where numpy's pairwise
    sum is not; numpy releases the GIL); the best of `repeats`."""
    data = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0))
    return best


def bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """bf16 tensors given as uint16 bit patterns."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


def llama4_tensors(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, experts: int,
                   inter: int, moe_layers: list[int], inter_mlp: int = 0, top_k: int = 1, seed: int = 0):
    """Random bf16 tensors (uint16 bits) of a Llama4ForCausalLM: MoE feed-forward blocks in
    moe_layers, dense SwiGLU MLPs of width inter_mlp elsewhere. Returns (tensors, bytes of weights
    one decoded token reads: an embedding row, attention, the dense MLP or the router, top_k
    experts and the shared expert, the norms and lm_head)."""
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.02):
        return bf16_bits(rng.standard_normal(shape, dtype=np.float32) * std)

    ones = bf16_bits(np.ones(hidden))
    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": ones, "lm_head.weight": w(vocab, hidden)}
    read = 2 * hidden + vocab * hidden
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ones
        t[p + "post_attention_layernorm.weight"] = ones
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        read += 2 * hidden + 2 * hidden * (heads + kv_heads) * head_dim
        f = p + "feed_forward."
        if i in moe_layers:
            t[f + "router.weight"] = w(experts, hidden)
            t[f + "experts.gate_up_proj"] = w(experts, hidden, 2 * inter)
            t[f + "experts.down_proj"] = w(experts, inter, hidden)
            t[f + "shared_expert.gate_proj.weight"] = w(inter, hidden)
            t[f + "shared_expert.up_proj.weight"] = w(inter, hidden)
            t[f + "shared_expert.down_proj.weight"] = w(hidden, inter)
            read += experts * hidden + (top_k + 1) * 3 * hidden * inter
        else:
            t[f + "gate_proj.weight"] = w(inter_mlp, hidden)
            t[f + "up_proj.weight"] = w(inter_mlp, hidden)
            t[f + "down_proj.weight"] = w(hidden, inter_mlp)
            read += 3 * hidden * inter_mlp
    return t, 2 * read


def synthetic_llama4(path: Path, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                     head_dim: int, experts: int, inter: int, seed: int = 0) -> dict:
    """A random bf16 Llama4ForCausalLM checkpoint with MoE on every layer (Scout's layout).
    Returns the config and the bytes of weights one decoded token reads."""
    config = dict(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, intermediate_size_mlp=2 * inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, num_local_experts=experts,
        num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8192,
        rope_theta=500000.0, rope_scaling=None, rms_norm_eps=1e-5, max_position_embeddings=1 << 20,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, dtype="bfloat16",
    )
    os.makedirs(path, exist_ok=True)
    (Path(path) / "config.json").write_text(json.dumps(config, indent=1))
    t, decode_bytes = llama4_tensors(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, experts=experts, inter=inter, moe_layers=list(range(layers)),
                                     seed=seed)
    write_safetensors(Path(path) / "model.safetensors", t)
    return dict(config=config, decode_bytes=decode_bytes, params=sum(int(np.prod(a.shape)) for a in t.values()))


def _packed_int8(out: int, k: int) -> int:
    """Corral's int8 panel layout: panels of 64 output columns, K padded to a multiple of 32, one
    group spanning the whole (padded) K with a float32 scale per output column."""
    kp = -(-k // 32) * 32
    return -(-out // 64) * 64 * (kp + 4)


def _packed_int4(out: int, k: int) -> int:
    """Corral's int4 panel layout: panels of 64 output columns, K padded to a multiple of 32, two
    weights a byte and a bfloat16 scale per output column per group of 32."""
    kp = -(-k // 32) * 32
    return -(-out // 64) * 64 * (kp // 2 + 2 * (kp // 32))


def decode_bytes(p, weights: str = "bf16") -> int:
    """Bytes of weights one decoded token reads in Corral's packed format `weights` (bf16, int8 or
    int4), from the shapes llama4_tensors takes (vocab, hidden, layers, heads, kv_heads, head_dim,
    experts, inter, inter_mlp, top_k and either moe_layers or moe_step, interleaved as Llama 4 does).
    Counts what llama4_tensors counts: an embedding row and the norms (bf16 in every format: the
    row is negligible), attention q/k/v/o, per layer the dense MLP or the router (bf16 in every
    format), the shared expert and top_k routed experts, and lm_head. bf16: 2 bytes a weight, the
    figure llama4_tensors returns. int8: every linear but the router int8, one float32 scale per
    output column (see _packed_int8). int4: the MLP matrices (dense, shared and routed experts)
    int4 with group 32 (see _packed_int4), attention and lm_head int8, the router bf16."""
    if weights not in ("bf16", "int8", "int4"):
        raise ValueError(f"weights: {weights!r} is not bf16, int8 or int4")
    H, L, V = p["hidden"], p["layers"], p["vocab"]
    nh, nkv, hd, E, top_k = p["heads"], p["kv_heads"], p["head_dim"], p["experts"], p.get("top_k", 1)
    I, D = p["inter"], p.get("inter_mlp", 0)
    if "moe_layers" in p:
        moe_layers = set(p["moe_layers"])
    else:
        moe_layers = set(range(p["moe_step"] - 1, L, p["moe_step"]))

    def linear(out, k, mlp=False):
        if weights == "bf16":
            return 2 * out * k
        return _packed_int4(out, k) if weights == "int4" and mlp else _packed_int8(out, k)

    def swiglu(width, copies=1):  # gate, up: width x H; down: H x width
        return copies * (2 * linear(width, H, mlp=True) + linear(H, width, mlp=True))

    total = 2 * (2 * H) + linear(V, H)  # an embedding row and the final norm, lm_head
    for i in range(L):
        total += 2 * (2 * H)  # the two norms
        total += linear(nh * hd, H) + 2 * linear(nkv * hd, H) + linear(H, nh * hd)
        if i in moe_layers:
            total += 2 * E * H + swiglu(I, top_k + 1)  # the router (bf16), top_k routed experts and the shared one
        else:
            total += swiglu(D)
    return total
