"""Llama 4 tool calls in model output, for the OpenAI-compatible server.

The model writes pythonic calls `[f(a=1), g(b="x")]` or JSON calls `{"name": "f", "parameters": {...}}`
(several joined by `; ` or newlines, or a JSON list of them), either form optionally wrapped in
<|python_start|>...<|python_end|> and possibly after some prose. One character-level state machine,
ToolCallStreamParser, serves streaming and complete output (parse_tool_calls runs it over the whole
text), so the two always agree, whatever the split into deltas.

A call block (a `[...]` list, or one `{...}` object) is held back while it could still be well formed
and released when it closes: as calls if it parses, else as content. A pythonic call is therefore
only sent once its list's `]` arrives, since a list cut off by max_tokens is content, not calls.
Separators after a call (whitespace, `;`) and the <|python_start|>/<|python_end|> markers are never
content, as if decoded with skip_special_tokens.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
_CLOSER = {"(": ")", "[": "]", "{": "}"}
_BLOCK_OR_MARKER = re.compile(r"[\[{<]")
# JSON literals the model writes inside pythonic calls (ast sees them as names).
_JSON_NAMES = {"true": True, "false": False, "null": None}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class ToolCallDelta:
    """A streamed piece of call `index`: the first carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def parse_tool_calls(text: str, tool_names: Collection[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """The content (text outside calls, None if blank) and the tool calls of a complete output."""
    parser = ToolCallStreamParser(tool_names)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    return (content if content.strip() else None), parser.calls


class ToolCallStreamParser:
    """Splits model output, fed in deltas, into content (str) and ToolCallDelta pieces.

    tool_names: the names a call may have (None: any); a block calling another name is content.
    """

    def __init__(self, tool_names: Collection[str] | None = None) -> None:
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self._calls: list[ToolCall] = []
        self._out: list[ToolCallDelta | str] = []
        self._mode = "text"  # text | after (a block; separators are dropped) | marker | block
        self._held: list[str] = []  # text that may yet be a marker or a call block (characters)
        self._marker_return = "text"  # the mode a held marker came from
        self._reset_block()

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def feed(self, delta: str) -> list[ToolCallDelta | str]:
        """What `delta` settles: content (str) and call deltas, in output order."""
        i = 0
        while i < len(delta):
            if self._mode == "text":
                # Fast path: prose up to the next character that may begin a block or a marker.
                m = _BLOCK_OR_MARKER.search(delta, i)
                end = m.start() if m else len(delta)
                self._content(delta[i:end])
                i = end
                if m is None:
                    break
            if self._step(delta[i]):
                i += 1
        return self._take()

    def finish(self) -> list[ToolCallDelta | str]:
        """The rest at end of output: whatever is still held (an unfinished block) is content."""
        if self._mode in ("marker", "block"):
            self._fail()
        self._mode = "text"
        return self._take()

    def _take(self) -> list[ToolCallDelta | str]:
        # Adjacent content pieces go out joined.
        out: list[ToolCallDelta | str] = []
        for is_text, group in itertools.groupby(self._out, key=lambda item: isinstance(item, str)):
            out.extend(["".join(group)] if is_text else group)
        self._out = []
        return out

    def _content(self, text: str) -> None:
        if text:
            self._out.append(text)

    def _fail(self) -> None:
        # The held text is prose after all; the character that broke it is looked at again as prose.
        self._content("".join(self._held))
        self._held, self._mode = [], "text"

    def _step(self, c: str) -> bool:
        """Takes one character; False when it must be taken again in the (new) mode."""
        if self._mode == "text" or self._mode == "after":
            if c in "[{":
                self._mode, self._held = "block", []
                self._reset_block()
            elif c == "<":
                self._marker_return = self._mode
                self._mode, self._held = "marker", ["<"]
                return True
            elif self._mode == "after" and (c.isspace() or c == ";"):
                return True
            elif self._mode == "after":
                self._mode = "text"
                return False
            else:
                self._content(c)
                return True
        if self._mode == "marker":
            return self._step_marker(c)
        state = self._step_block(c)
        if state == "fail":
            self._fail()
            return False
        self._held.append(c)
        if state == "done":
            self._close_block()
        return True

    def _step_marker(self, c: str) -> bool:
        # The markers are dropped, as decoding with skip_special_tokens would; a start marker may
        # open a call block.
        held = "".join(self._held) + c
        if held == PYTHON_END:
            self._mode, self._held = self._marker_return, []
        elif held == PYTHON_START:
            self._mode, self._held = "block", []
            self._reset_block()
        elif PYTHON_START.startswith(held) or PYTHON_END.startswith(held):
            self._held = [held]
        else:
            self._fail()
            return False
        return True

    # Call blocks: the brackets and strings are tracked character by character, and the top level of
    # the block is checked as it goes (`[` name `(` ... `)` `,` ... `]`, or `{"`...) so that prose
    # stops being held as soon as it cannot be a call. The closed block is then parsed in full.

    def _reset_block(self) -> None:
        self._expect: str | None = "start"  # start | key | item | name | paren | sep | None (nested)
        self._stack = ""  # open brackets
        self._quote: str | None = None  # open string's quote
        self._triple = False
        self._fresh = False  # the string has no character yet
        self._escape = False
        self._quotes_run = 0  # closing quotes seen in a row (triple-quoted strings)
        self._after_empty: str | None = None  # `""` just closed: a third quote opens a """ string
        self._name = ""

    def _step_block(self, c: str) -> str:
        """"more", "done" (the block closed) or "fail" (it cannot be a call block)."""
        if self._quote is not None:
            self._step_string(c)
            return "more"
        expect = self._expect
        if expect is None:
            return self._step_nested(c)
        if expect == "item" and c.isidentifier():
            self._name, expect = "", "name"
        if expect == "name":
            if (self._name + c).isidentifier():
                self._name, self._expect = self._name + c, "name"
                names = self.tool_names
                return "more" if names is None or any(n.startswith(self._name) for n in names) else "fail"
            expect = self._expect = "paren"
        if c.isspace():
            return "more"
        if expect == "start" and c in "[{":
            self._stack = c
            self._expect = "item" if c == "[" else "key"
            return "more"
        if expect == "key" and c == '"':  # a JSON call object starts with a key
            self._expect = None
            self._open_string(c)
            return "more"
        if expect in ("item", "sep") and c == "]":
            return "done"
        if expect == "sep" and c == ",":
            self._expect = "item"
            return "more"
        if (expect == "paren" and c == "(") or (expect == "item" and c == "{"):
            return self._step_nested(c)
        return "fail"

    def _step_nested(self, c: str) -> str:
        if self._after_empty is not None:
            quote, self._after_empty = self._after_empty, None
            if c == quote:
                self._quote, self._triple, self._quotes_run = quote, True, 0
                return "more"
        self._expect = None
        if c in "'\"":
            self._open_string(c)
        elif c in _CLOSER:
            self._stack += c
        elif c in ")]}":
            if _CLOSER[self._stack[-1]] != c:
                return "fail"
            self._stack = self._stack[:-1]
            if not self._stack:
                return "done"
            if self._stack == "[":
                self._expect = "sep"
        return "more"

    def _open_string(self, quote: str) -> None:
        self._quote, self._triple, self._fresh, self._escape = quote, False, True, False

    def _step_string(self, c: str) -> None:
        fresh, self._fresh = self._fresh, False
        if self._escape:
            self._escape, self._quotes_run = False, 0
        elif c == "\\":
            self._escape, self._quotes_run = True, 0
        elif c != self._quote:
            self._quotes_run = 0
        elif not self._triple:
            self._quote = None
            if fresh:
                self._after_empty = c
        else:
            self._quotes_run += 1
            if self._quotes_run == 3:
                self._quote = None

    def _close_block(self) -> None:
        calls = _parse_block("".join(self._held).lstrip())
        if calls is None or (self.tool_names is not None and any(n not in self.tool_names for n, _ in calls)):
            self._fail()
            return
        for name, arguments in calls:
            call = ToolCall(id=f"chatcmpl-tool-{uuid.uuid4().hex}", name=name, arguments=arguments)
            self._out.append(ToolCallDelta(index=len(self._calls), id=call.id, name=name, arguments=arguments))
            self._calls.append(call)
        self._held, self._mode = [], "after"


def _parse_block(block: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) of each call in a closed block, or None if it is not a call block."""
    try:
        value = json.loads(block)
    except (ValueError, RecursionError):
        calls = _parse_pythonic(block)
    else:
        calls = _json_calls(value if isinstance(value, list) else [value])
    if not calls:
        return None
    try:
        return [(_utf16(name), _utf16(json.dumps(args, ensure_ascii=False, allow_nan=False))) for name, args in calls]
    except (ValueError, RecursionError):  # NaN or infinity
        return None


def _utf16(text: str) -> str:
    # Escapes such as "\ud83d\ude00" decode to surrogates: pair them up, and replace lone ones, which
    # cannot be encoded as UTF-8.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _json_calls(items: list[Any]) -> list[tuple[str, dict]] | None:
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        args = item.get("parameters", item.get("arguments"))
        if isinstance(args, str):  # arguments as a JSON string, OpenAI style
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        calls.append((item["name"], args))
    return calls


def _parse_pythonic(block: str) -> list[tuple[str, dict]] | None:
    try:
        tree = ast.parse(block, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        names = [k.arg for k in node.keywords]
        if None in names or len(set(names)) != len(names):  # **kwargs, or a repeated argument
            return None
        try:
            calls.append((node.func.id, {k.arg: _literal(k.value) for k in node.keywords}))
        except (ValueError, RecursionError):
            return None
    return calls


def _literal(node: ast.expr) -> Any:
    """A JSON value written as a Python literal (JSON's true/false/null allowed too)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if type(value) in (int, float):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [_literal(k) if k is not None else None for k in node.keys]
        if all(isinstance(k, str) for k in keys):
            return dict(zip(keys, (_literal(v) for v in node.values)))
    raise ValueError(f"not a JSON literal: {ast.dump(node)}")


def prepare_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict]:
    """OpenAI chat messages as HF chat templates expect them: None fields dropped and tool call
    arguments parsed from JSON text to dicts (text that is not a JSON object is left as it is)."""
    prepared = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_prepare_call(c) for c in message["tool_calls"]]
        prepared.append(message)
    return prepared


def _prepare_call(call: Any) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    function = {k: v for k, v in call["function"].items() if v is not None}
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        function["arguments"] = {}
    elif isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {**{k: v for k, v in call.items() if v is not None}, "function": function}
