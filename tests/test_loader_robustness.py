"""Regression tests for checkpoint folders found by tools/fuzz_loader.py: each must raise its
corral.CorralError subclass with a message naming the file, never another exception or a crash."""

from __future__ import annotations

import json
import struct

import pytest

import corral
from checkpoint_files import TEXT_KW

# JSON that stops at a byte that is not UTF-8 (alone, or cutting a character short): the parser's
# message quotes the bytes last read, and a message that is not UTF-8 came out of corral.LLM as a
# UnicodeDecodeError.
NOT_UTF8 = [b"\xbe", b'{"weight_map": {"a": 1, "\xff\xfe', b"[\xc3"]


def load(path):
    return corral.LLM(path, skip_tokenizer_init=True, kv_cache_bytes=1 << 20)


def expect(path, cls, file, fragment):
    with pytest.raises(cls) as info:
        load(path)
    msg = str(info.value)
    assert str(file) in msg and fragment in msg, msg


@pytest.mark.parametrize("text", NOT_UTF8)
def test_config_not_utf8(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (tmp_path / "config.json").write_bytes(text)
    expect(tmp_path, corral.ConfigError, tmp_path / "config.json", "not valid JSON")


@pytest.mark.parametrize("text", NOT_UTF8)
def test_index_not_utf8(tmp_path, text):
    (tmp_path / "config.json").write_text(json.dumps(TEXT_KW))
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(text)
    expect(tmp_path, corral.CorruptCheckpointError, index, "not valid JSON")


@pytest.mark.parametrize("text", NOT_UTF8)
def test_safetensors_header_not_utf8(tmp_path, text):
    (tmp_path / "config.json").write_text(json.dumps(TEXT_KW))
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(text)) + text)
    expect(tmp_path, corral.CorruptCheckpointError, f, "not valid JSON")


def test_long_non_ascii_value_in_error(tmp_path):
    """A field's value is quoted cut after 80 bytes, which may fall inside a UTF-8 character."""
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TEXT_KW, vocab_size="a" * 59 + "é" * 40), ensure_ascii=False), encoding="utf-8")
    expect(tmp_path, corral.ConfigError, config, "'vocab_size'")
