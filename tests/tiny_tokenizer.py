"""A tiny Llama-4-format tokenizer for the tests, built here and saved with transformers.

The byte-level BPE of tools/llama4_tokenizer.py (Llama 4's regex, decoder, special tokens, BOS
post-processor and chat template), trained on a few stdlib docstrings plus some repeated non-Latin
text (so that some merges cross UTF-8 character boundaries). Its size is the tiny models'
vocabulary (tiny_models.VOCAB), and the special tokens take the ids the tiny configs use: pad 0,
bos 1, eos (<|end_of_text|>) 2.
"""

from __future__ import annotations

import collections
import inspect
import json
import sys
import textwrap
from pathlib import Path

from tiny_models import VOCAB

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import llama4_tokenizer  # noqa: E402  (tools/llama4_tokenizer.py: shared with the demo model's training)
from llama4_tokenizer import BOS, END_OF_TEXT, EOM, EOT, HEADER_END, HEADER_START, PAD, SPECIAL_TOKENS  # noqa: E402,F401

NON_LATIN = ["日本語のテキストです。", "Ünïcödé façade — naïve café", "Привет, мир!", "🙂🎉👍🏽"]


def corpus() -> list[str]:
    docs = [inspect.getdoc(o) for o in (str, dict, list, json, collections, textwrap, inspect.getdoc, int, zip)]
    return docs + NON_LATIN * 20


def backend():
    return llama4_tokenizer.train_bpe(corpus(), VOCAB)


def save(path: Path, *, legacy: bool = False, **config) -> Path:
    """Saves the tokenizer with transformers into `path` (instruct style: eos_token <|eot|>).

    legacy=True writes the layout of checkpoints saved by older transformers, the published
    Llama 4 ones among them: the chat template inside tokenizer_config.json, with
    added_tokens_decoder. `config` entries are written into tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    llama4_tokenizer.save(backend(), path)
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
