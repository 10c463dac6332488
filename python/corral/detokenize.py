"""Incremental detokenization: text deltas as tokens arrive, and stop strings.

A byte-level BPE token can end in the middle of a UTF-8 character; the complete characters before
it are given at once, and the incomplete one is held back until a later token completes it. Each
delta is the difference between the decodings of a short window of recent tokens with and without
the new ones, and the window only ever starts where the text decoded so far ended cleanly, so the
deltas add up to tokenizer.decode(all tokens).

Stop strings: the text ends before the first occurrence of any of them (or after it, with
include_stop_str_in_output), also when one spans several tokens: the occurrence that starts first,
the shortest of those that start together, whatever the tokens. Text that may be the beginning of a
stop string is held back until the next tokens decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from corral.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """Turns one sample's output tokens into text, one delta at a time.

    add(token_id) returns the text that became final ("" when the token completes no character
    or its text may still turn out to be part of a stop string); finish() returns what is left
    when generation ends. `text` is the output text so far (held-back text included); after a stop
    string, `stop_reason` is that string and `stopped` is True.

    Stop strings only count once min_tokens tokens have been generated (as vLLM does): an
    occurrence that ends within the text of the first min_tokens - 1 tokens is ignored.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        self._text = ""  # decoded text whose characters are complete
        self._emitted = 0  # characters of _text already returned
        self._prefix_offset = 0  # window of token_ids decoded on each step: [prefix, read) is done,
        self._read_offset = 0  # [read, len) is new
        self._provisional = 0  # characters of the new part already given (before an incomplete one)
        self._stop_floor = 0  # stop strings must end after this many characters (min_tokens)
        self._pending: tuple[int, str] | None = None  # a stop found while an earlier one may complete
        self._finished = False

    @property
    def text(self) -> str:
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def finished(self) -> bool:
        return self._finished

    def add(self, token_id: int) -> str:
        """Feeds one token; returns the new final text."""
        if self._finished:
            raise RuntimeError("add() after the detokenizer finished")
        self.token_ids.append(int(token_id))
        new = self._decode_new(final=False)
        return self._extend(new)

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Feeds several tokens (stops at a stop string); returns the new final text."""
        out = []
        for t in token_ids:
            if self._finished:
                break
            out.append(self.add(t))
        return "".join(out)

    def finish(self) -> str:
        """Generation ended: returns the rest of the text, incomplete characters included."""
        if self._finished:
            return ""
        return self._extend(self._decode_new(final=True), final=True)

    def _decode_new(self, final: bool) -> str:
        ids = self.token_ids
        decode = self.tokenizer.decode
        prefix = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        new = full[len(prefix) :]
        if final or not new.endswith(_REPLACEMENT):
            # Every character is complete: the next window starts here.
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            out, self._provisional = new[self._provisional :], 0
            return out
        # The last character is incomplete: give the complete ones before it, wait for the rest.
        complete = new.rstrip(_REPLACEMENT)
        if len(complete) <= self._provisional:
            return ""
        out, self._provisional = complete[self._provisional :], len(complete)
        return out

    def _extend(self, new: str, final: bool = False) -> str:
        before = len(self._text)
        self._text += new
        if len(self.token_ids) < self.min_tokens and not final:
            self._stop_floor = len(self._text)
        end = len(self._text)
        if self.stop:
            match = self._find_stop(before)
            if self._pending is not None and (match is None or self._pending[0] <= match[0]):
                match = self._pending
            partial = self._partial_length()
            if match is not None and (final or len(self._text) - partial >= match[0]):
                at, stop = match
                self._text = self._text[: at + len(stop) if self.include_stop_str_in_output else at]
                self.stop_reason = stop
                end, final = len(self._text), True
            elif match is not None:
                # A stop string that starts earlier may still complete: wait for it.
                self._pending = match
                end = match[0] + len(match[1]) if self.include_stop_str_in_output else match[0]
            if not final and not self.include_stop_str_in_output:
                end = min(end, len(self._text) - partial)
        delta = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        self._finished = final
        return delta

    def _find_stop(self, before: int) -> tuple[int, str] | None:
        """The earliest (then shortest) stop string that ends in the new text, after the
        min_tokens floor."""
        best = None
        for stop in self.stop:
            at = self._text.find(stop, max(0, before - len(stop) + 1))
            while at != -1 and at + len(stop) <= self._stop_floor:
                at = self._text.find(stop, at + 1)
            if at != -1 and (best is None or (at, len(stop)) < (best[0], len(best[1]))):
                best = (at, stop)
        return best

    def _partial_length(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        text = self._text
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
