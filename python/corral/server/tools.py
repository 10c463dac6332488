"""A chat request's tools: checking tools/tool_choice, what they add to the prompt and to decoding,
and reading calls back out of the model's text.

tool_choice "none" keeps the tools in the prompt (vLLM's default) and reads no calls; "auto" (the
default with tools) reads calls from whatever the model writes; "required" and a named function
also constrain decoding to calls, with a grammar from corral.structured_output, so even a model
never trained on tools answers with a valid call.
"""

from __future__ import annotations

import dataclasses

from corral.server.errors import bad_request
from corral.server.protocol import ChatCompletionRequest, NamedToolChoice, tool_call, tool_call_delta
from corral.structured_output import tool_call_grammar
from corral.tool_calls import ToolCallDelta, ToolCallStreamParser, parse_tool_calls


class ToolUse:
    def __init__(self, request: ChatCompletionRequest, chat_template: str) -> None:
        tools, choice = request.tools, request.tool_choice
        if tools is not None and not tools:
            raise bad_request("tools must not be empty (leave it out instead)", "tools")
        if tools is None and choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        self.names = [t.function.name for t in tools or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.names:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among the tools", "tool_choice")
        self.template_tools = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        self.reads_calls = bool(tools) and choice != "none"
        self.constraint: dict = {}
        if self.reads_calls and choice not in (None, "auto"):
            forced = "required" if choice == "required" else choice.model_dump()
            # The call syntax the template asks the model for: Meta's pythonic prompt, else JSON.
            style = "pythonic" if "[func_name1(" in chat_template else "json"
            self.constraint = {"grammar": tool_call_grammar(self.template_tools, forced, style=style)}

    @property
    def skip_special_tokens(self) -> bool | None:
        """Calls may come wrapped in <|python_start|>...<|python_end|>: keep those in the text for
        the parser (which drops them), instead of the request's choice."""
        return False if self.reads_calls else None

    def message(self, text: str) -> tuple[dict, bool]:
        """The assistant message of a complete output, and whether it carries tool calls."""
        if not self.reads_calls:
            return {"role": "assistant", "content": text}, False
        content, calls = parse_tool_calls(text, self.names)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [tool_call(c) for c in calls]
        return message, bool(calls)

    def stream_parser(self) -> ToolCallStreamParser | None:
        return ToolCallStreamParser(self.names) if self.reads_calls else None


def stream_deltas(pieces: list) -> list[dict]:
    """A stream parser's pieces (content text, ToolCallDelta) as chunk deltas. A call's first
    piece goes out as two deltas, as vLLM streams calls: its id and name (arguments ""), then its
    arguments."""
    out = []
    for p in pieces:
        if not isinstance(p, ToolCallDelta):
            if p:
                out.append({"content": p})
            continue
        if p.id is not None and p.arguments:
            out.append({"tool_calls": [tool_call_delta(dataclasses.replace(p, arguments=""))]})
            p = ToolCallDelta(p.index, arguments=p.arguments)
        out.append({"tool_calls": [tool_call_delta(p)]})
    return out
