"""Llama 4-format tokenizers trained with HF `tokenizers`: the demo model's (tools/train_demo_model.py)
and the tests' tiny one (tests/tiny_tokenizer.py).

Byte-level BPE with Llama 4's pre-tokenizer regex, byte-level decoder, special tokens (with their
ids) and BOS post-processor, saved through transformers with Llama 4's chat template, as an
instruct checkpoint's tokenizer (eos_token <|eot|>).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_CHAT_TEMPLATE

# Llama 4's pre-tokenizer regex (O200K_PATTERN of Meta's tokenizer.py and HF's converter).
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 4's special tokens; their order here gives their ids.
SPECIAL_TOKENS = [
    "<|finetune_right_pad|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|image|>",
]
PAD, BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOM, EOT = range(7)
STOP_TOKENS = [END_OF_TEXT, EOM, EOT]


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE of exactly vocab_size tokens (special ones included) trained on texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    bos = SPECIAL_TOKENS[BOS]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, BOS)]
            ),
        ]
    )
    return tok


def save(tok: Tokenizer, path: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, written by transformers."""
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS],
        eos_token=SPECIAL_TOKENS[EOT],
        pad_token=SPECIAL_TOKENS[PAD],
        chat_template=LLAMA4_CHAT_TEMPLATE,
        model_max_length=4096,
    ).save_pretrained(path)
