"""The tokenizer of a Hugging Face checkpoint folder: tokenizer.json (HF `tokenizers`), the special
tokens of tokenizer_config.json, and the chat template, loaded the way transformers loads them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from corral import _core
from corral.json_file import read_json_object
from corral.chat_template import is_conversation_list, render

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATES_DIR = "additional_chat_templates"
PROCESSOR_CHAT_TEMPLATE_FILE = "chat_template.json"

# Named special tokens, as transformers passes them to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class NoTokenizerError(_core.ModelFileNotFoundError, NotImplementedError):
    """Text in or out needs the model's tokenizer (tokenizer.json), and there is none. Also a
    NotImplementedError, which text prompts raised before the tokenizer layer existed."""


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json holds special tokens as strings or as serialized AddedTokens.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise _core.ConfigError(f"{TOKENIZER_CONFIG_FILE}: a special token is {value!r}, not a string")


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens as transformers collects them: the standard names, then any other
    `*_token` entry holding a token (e.g. image_token), then a dict `extra_special_tokens`."""
    named = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    for key, value in config.items():
        if key.endswith("_token") and key not in named and (isinstance(value, str) or _is_added_token(value)):
            named[key] = value
    if isinstance(config.get("extra_special_tokens"), Mapping):
        named.update(config["extra_special_tokens"])
    return {name: _token_content(v) for name, v in named.items() if v is not None}


def _is_added_token(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("__type") == "AddedToken" and isinstance(value.get("content"), str)



def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether the folder holds a tokenizer (tokenizer.json)."""
    return (Path(path) / TOKENIZER_FILE).is_file()


class Tokenizer:
    """A checkpoint's tokenizer.

    Encodes and decodes with the folder's tokenizer.json, whose post-processor adds the BOS (as
    in transformers 5, tokenizer_config.json's add_bos_token/add_eos_token do not override it);
    reads the special tokens (bos_token, eos_token, pad_token, ..., added_tokens_decoder) from
    tokenizer_config.json and the chat template from chat_template.jinja (and
    additional_chat_templates/*.jinja), tokenizer_config.json's `chat_template` (a string or a list of named
    templates) or a processor's chat_template.json, in transformers' order of precedence.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        folder = Path(path)
        if not folder.is_dir():
            raise _core.ModelFileNotFoundError(f"tokenizer folder {folder} does not exist")
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise NoTokenizerError(f"tokenizer file {file} not found")
        self.path = os.fspath(folder)
        try:
            self._backend = _Backend.from_file(os.fspath(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise _core.ConfigError(f"{file} cannot be read as a tokenizer: {e}") from None

        config = read_json_object(folder / TOKENIZER_CONFIG_FILE) if (folder / TOKENIZER_CONFIG_FILE).is_file() else {}
        if "added_tokens_decoder" not in config and (folder / SPECIAL_TOKENS_MAP_FILE).is_file():
            config = read_json_object(folder / SPECIAL_TOKENS_MAP_FILE) | config  # the legacy file
        self.config = config
        self._special = _named_special_tokens(config)
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self._extra_special = [] if isinstance(extra, Mapping) else [_token_content(t) for t in extra]
        self._add_missing_tokens(config.get("added_tokens_decoder") or {})

        self.chat_template = _load_chat_templates(folder, config)
        self._added = {i: t.content for i, t in self._backend.get_added_tokens_decoder().items()}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(path)

    def _add_missing_tokens(self, added_tokens_decoder: Mapping[str, Any]) -> None:
        # As transformers does: tokens of tokenizer_config.json that tokenizer.json lacks, then
        # named special tokens absent from the vocabulary, are appended to it.
        for index, token in sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0])):
            if not isinstance(token, Mapping) or not isinstance(token.get("content"), str):
                raise _core.ConfigError(f"{TOKENIZER_CONFIG_FILE}: added_tokens_decoder[{index}] is {token!r}")
            if self._backend.id_to_token(int(index)) != token["content"]:
                fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
                self._backend.add_tokens([AddedToken(token["content"], **{k: token[k] for k in fields if k in token})])
        missing = [t for t in self._special.values() if self._backend.token_to_id(t) is None]
        if missing:
            tokens = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            self._backend.add_special_tokens(tokens)

    # Vocabulary and special tokens.

    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as transformers counts it)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (bos_token, eos_token, ...): variables of the chat template."""
        return dict(self._special)

    @property
    def added_tokens_decoder(self) -> dict[int, str]:
        return dict(self._added)

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then extra_special_tokens (transformers' list; every added
        token marked special is left out of text with skip_special_tokens, listed or not)."""
        return list(dict.fromkeys([*self._special.values(), *self._extra_special]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.token_to_id(t) for t in self.all_special_tokens]

    bos_token = property(lambda self: self._special.get("bos_token"))
    eos_token = property(lambda self: self._special.get("eos_token"))
    pad_token = property(lambda self: self._special.get("pad_token"))
    unk_token = property(lambda self: self._special.get("unk_token"))
    bos_token_id = property(lambda self: self.token_to_id(self.bos_token))
    eos_token_id = property(lambda self: self.token_to_id(self.eos_token))
    pad_token_id = property(lambda self: self.token_to_id(self.pad_token))
    unk_token_id = property(lambda self: self.token_to_id(self.unk_token))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.id_to_token(ids)
        return [self.id_to_token(int(i)) for i in ids]

    # Text.

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens applies the post-processor (Llama 4: a leading
        <|begin_of_text|>); a rendered chat prompt already has its BOS, so encode it without."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `token_ids` (ids outside the vocabulary decode to nothing)."""
        return self._backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens=add_special_tokens)

    # Chat.

    def get_chat_template(self, chat_template: str | None = None, tools: Sequence[Any] | None = None) -> str:
        """The template text to use: `chat_template` (a template or the name of one of the
        model's), else the model's ("tool_use" when tools are given and the model names one)."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError(
                    f"{self.path} has several chat templates and no default: pass chat_template= one of "
                    f"{sorted(templates)}"
                )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError(f"{self.path} has no chat template: pass chat_template= a Jinja template")
        return templates

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int] | list[str] | list[list[int]]:
        """Renders a conversation (list of messages) or a list of conversations like transformers'
        apply_chat_template: the same text, and with tokenize=True the same token ids (encoded
        without adding special tokens: the template writes the BOS). kwargs are further template
        variables."""
        template = self.get_chat_template(chat_template, tools)
        batched = is_conversation_list(conversation)
        conversations = conversation if batched else [conversation]
        if not conversations or (not batched and len(conversation) == 0):
            raise ValueError("cannot apply a chat template to an empty conversation")
        variables = {**self._special, **kwargs}
        texts = [
            render(
                template,
                c,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **variables,
            )
            for c in conversations
        ]
        out = [self.encode(t, add_special_tokens=False) for t in texts] if tokenize else texts
        return out if batched else out[0]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab={len(self)}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _load_chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    # transformers' precedence: chat_template.jinja and additional_chat_templates/*.jinja over the config's.
    templates: dict[str, str] = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATES_DIR).is_dir():
        for file in sorted((folder / CHAT_TEMPLATES_DIR).glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if not templates:
        value = config.get("chat_template")
        if value is None and (folder / PROCESSOR_CHAT_TEMPLATE_FILE).is_file():
            value = read_json_object(folder / PROCESSOR_CHAT_TEMPLATE_FILE).get("chat_template")
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            try:
                return {t["name"]: t["template"] for t in value}
            except (KeyError, TypeError):
                raise _core.ConfigError(f"{folder}: chat_template is a list but not of {{name, template}}") from None
        if value is not None:
            raise _core.ConfigError(f"{folder}: chat_template is {type(value).__name__}, not a string or a list")
        return None
    if list(templates) == ["default"]:
        return templates["default"]
    return templates
