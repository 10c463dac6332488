"""A tiny Llama-4-format tokenizer, built here and saved with transformers.

Byte-level BPE with Llama 4's pre-tokenizer regex, decoder and BOS post-processor, trained with HF
`tokenizers` on a few stdlib docstrings plus some repeated non-Latin text (so that some merges
cross UTF-8 character boundaries), with Llama 4's special tokens and transformers' Llama 4 chat
template. Its size is the tiny models' vocabulary (tiny_models.VOCAB), and the special tokens take
the ids the tiny configs use: pad 0, bos 1, eos (<|end_of_text|>) 2.
"""

from __future__ import annotations

import collections
import inspect
import json
import textwrap
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_CHAT_TEMPLATE

from tiny_models import VOCAB

# Llama 4's pre-tokenizer regex (O200K_PATTERN of Meta's tokenizer.py and HF's converter).
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
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
NON_LATIN = ["日本語のテキストです。", "Ünïcödé façade — naïve café", "Привет, мир!", "🙂🎉👍🏽"]


def corpus() -> list[str]:
    docs = [inspect.getdoc(o) for o in (str, dict, list, json, collections, textwrap, inspect.getdoc, int, zip)]
    return docs + NON_LATIN * 20


def backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
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


def save(path: Path, *, legacy: bool = False, **config) -> Path:
    """Saves the tokenizer with transformers into `path` (instruct style: eos_token <|eot|>).

    legacy=True writes the layout of checkpoints saved by older transformers, the published
    Llama 4 ones among them: the chat template inside tokenizer_config.json, with
    added_tokens_decoder. `config` entries are written into tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend(),
        bos_token=SPECIAL_TOKENS[BOS],
        eos_token=SPECIAL_TOKENS[EOT],
        pad_token=SPECIAL_TOKENS[PAD],
        chat_template=LLAMA4_CHAT_TEMPLATE,
        model_max_length=4096,
    )
    fast.save_pretrained(path)
    file = path / "tokenizer_config.json"
    cfg = json.loads(file.read_text())
    if legacy:
        jinja = path / "chat_template.jinja"
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
        added = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
        cfg["added_tokens_decoder"] = {str(t.pop("id")): t for t in added}
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(config)
    file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return path
