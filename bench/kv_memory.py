"""KV-cache memory of Llama 4 Scout and Maverick at their real shapes, as Corral lays it out:
bytes per token, and the cache of one 1,048,576-token sequence with and without the chunked-local
savings (local layers keep only the chunk of the next token), for bf16 and fp8 KV.

    python bench/kv_memory.py [--tokens 1048576] [--block-size 16]

Runs no model: the layout comes from the config alone (corral._core.KvLayout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from corral import _core

# Published text configs (shared/docs/llama4.md, section 1.2): only what shapes the KV cache differs.
COMMON = dict(
    model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
    intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
    head_dim=128, attention_chunk_size=8192, no_rope_layer_interval=4,
)
MODELS = {
    "Scout": dict(COMMON, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True),
    "Maverick": dict(COMMON, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False),
}


def gib(b: float) -> str:
    return f"{b / 2**30:9.3f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    n = args.tokens
    print(f"{'model':<9}{'KV dtype':<10}{'groups g+l':>11}{'bytes/token':>13}{'no savings':>16}{'chunk savings':>16}"
          f"{'formula':>16}{'saved':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in MODELS.items():
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(config))
            for dtype, size in (("bfloat16", 2), ("fp8", 1)):
                layout = _core.KvLayout.from_config(str(path), block_size=args.block_size, dtype=dtype)
                full = layout.sequence_bytes(n, False)
                saved = layout.sequence_bytes(n, True)
                # 12 global layers keep n tokens, 36 local layers min(n, 8192); K and V, 8 heads of 128.
                per_layer_token = 2 * 8 * 128 * size
                formula = per_layer_token * (12 * n + 36 * min(n, 8192))
                print(f"{name:<9}{dtype:<10}{f'{layout.global_groups}+{layout.local_groups}':>11}"
                      f"{layout.bytes_per_token:>13.1f}{gib(full):>16}{gib(saved):>16}{gib(formula):>16}"
                      f"{full / saved:>7.2f}x")
    print(f"({n:,} tokens, block size {args.block_size}; fp8 counts its per-block, per-head float scales; "
          "formula: values only)")


if __name__ == "__main__":
    main()
