"""JSON files of a model folder (generation_config.json, tokenizer files, config.json for the
CLI): whatever is wrong with one (unreadable, not UTF-8, not JSON, nested past Python's recursion
limit, not an object) is a ConfigError naming the file."""

from __future__ import annotations

import json
import os
from typing import Any

from corral import _core


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _core.ConfigError(f"{os.fspath(path)} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise _core.ConfigError(f"{os.fspath(path)} must hold a JSON object, got {type(value).__name__}")
    return value
