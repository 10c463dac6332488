"""Tiny random Llama 4 checkpoints, built and saved with transformers (seeded).

Three shapes cover what differs between Llama 4 models:
- scout:    every layer MoE, 16 experts, top-1, shared expert, QK norm, llama3 RoPE scaling
            (Scout's 16/1/1 rule), GQA 2.
- maverick: MoE every 2nd layer with 128 experts, dense MLP layers between (their own width), no
            QK norm, no RoPE scaling, GQA 5.
- chunked:  attention_chunk_size 16 and floor_scale 4 so a 100+ token prompt crosses chunk
            boundaries and NoPE layers (every 4th) apply temperature tuning; llama3 scaling with
            the release-day 8/1/4 values, GQA 8, top-2 routing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)

VOCAB = 384

TEXT_CONFIGS = {
    "scout": dict(
        hidden_size=64,
        intermediate_size=48,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=16,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        attention_chunk_size=32,
        floor_scale=8,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=64,
        ),
    ),
    "maverick": dict(
        hidden_size=80,
        intermediate_size=40,
        intermediate_size_mlp=112,
        num_hidden_layers=4,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=128,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        attention_chunk_size=24,
        floor_scale=8,
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    ),
    "chunked": dict(
        hidden_size=96,
        intermediate_size=40,
        intermediate_size_mlp=72,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        use_qk_norm=True,
        attention_chunk_size=16,
        floor_scale=4,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
}

VISION_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=128,  # the pixel shuffle's output width: 4 * hidden_size
    image_size=28,
    patch_size=14,
    vision_output_dim=32,
    projector_input_dim=32,
    projector_output_dim=32,
)


def text_config(variant: str, **overrides) -> Llama4TextConfig:
    kw = dict(vocab_size=VOCAB) | copy.deepcopy(TEXT_CONFIGS[variant]) | overrides
    return Llama4TextConfig(
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.08,
        **kw,
    )


def build(variant: str, layout: str, dtype: torch.dtype, path: Path, seed: int = 0, **overrides) -> Path:
    """Saves a seeded random model: layout 'causal' (Llama4ForCausalLM) or 'conditional'
    (Llama4ForConditionalGeneration, text model under language_model., with a vision tower).
    `overrides` replace fields of the variant's text config."""
    torch.manual_seed(seed)
    tc = text_config(variant, **overrides)
    if layout == "causal":
        model = Llama4ForCausalLM(tc)
    elif layout == "conditional":
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=tc.to_dict(), vision_config=VISION_CONFIG))
    else:
        raise ValueError(layout)
    model.to(dtype).save_pretrained(path)
    return path


def load_reference(path: Path, layout: str) -> torch.nn.Module:
    """The transformers model of a saved checkpoint, in float32 (bf16 weights are upcast exactly)."""
    cls = Llama4ForCausalLM if layout == "causal" else Llama4ForConditionalGeneration
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Llama4ForCausalLM inside a loaded model. transformers 5.24's
    Llama4ForConditionalGeneration.forward fails on text-only input (it reads `image_outputs` from
    its language model's output), so the multimodal reference runs its loaded language_model."""
    return getattr(model, "language_model", model)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, token_ids: list[int]):
    return text_model(model)(input_ids=torch.tensor([token_ids])).logits[0].double().numpy()


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, token_ids: list[int], steps: int) -> list[int]:
    out = text_model(model).generate(
        input_ids=torch.tensor([token_ids]),
        attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
        pad_token_id=0,
    )
    return out[0, len(token_ids) :].tolist()
