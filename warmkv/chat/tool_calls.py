"""Tool calls in model output: parsing them into OpenAI `tool_calls`, also while streaming.

A parser knows one model family's markers. Hermes/Qwen style is built in; `register_parser` adds another
(the model-specific hook), selected with `warmkv serve --tool-parser NAME`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field

from warmkv.text import partial_marker_length

log = logging.getLogger("warmkv.chat")


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (the OpenAI wire form)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


class ToolCallParser:
    """Calls wrapped as <start>{"name": ..., "arguments": {...}}<end>: the Hermes format Qwen uses."""

    start = "<tool_call>"
    end = "</tool_call>"

    def parse_one(self, body: str) -> ToolCall | None:
        try:
            payload = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return None
        naming = self.naming(payload["name"])
        if body.startswith(naming) and set(payload) == {"name", "arguments"}:
            # laid out as we render calls: the arguments as written (json.dumps would turn 1e999 into
            # Infinity, which is no JSON, and re-escape text)
            return self.parse_arguments(payload["name"], body[len(naming) :])
        arguments = payload.get("arguments", payload.get("parameters", {}))
        return ToolCall(payload["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))

    def parse_arguments(self, name: str, text: str) -> ToolCall | None:
        """A call to `name` whose arguments object opens `text`; text after the object is ignored."""
        text = text.lstrip()
        try:
            arguments, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            return None
        return ToolCall(name, text[:end]) if isinstance(arguments, dict) else None

    @property
    def opening(self) -> str:
        """A call's text before its function is named."""
        return f"{self.start}\n"

    def naming(self, name: str) -> str:
        """What follows the opening: the function's name, up to its arguments object."""
        return f'{{"name": {json.dumps(name)}, "arguments": '

    @property
    def call_tail(self) -> str:
        """What closes a call after its arguments object."""
        return "}\n" + self.end

    calls_separator = "\n"  # between parallel calls

    def render_call(self, name: str, arguments: str) -> str:
        """How an earlier call reads in the prompt, for templates that know no tool calls."""
        return f"{self.opening}{self.naming(name)}{arguments}{self.call_tail}"


PARSERS: dict[str, ToolCallParser] = {"hermes": ToolCallParser()}


def register_parser(name: str, parser: ToolCallParser) -> None:
    PARSERS[name] = parser


class ToolCallStreamer:
    """Splits streamed text into content and tool calls; a call is released once its end marker arrives."""

    def __init__(self, parser: ToolCallParser, tool_names: set[str]) -> None:
        self.parser = parser
        self.tool_names = tool_names  # a call to any other function is malformed
        self.calls: list[ToolCall] = []
        self._buffer = ""  # text not yet released: inside a call, or a possible start marker
        self._in_call = False
        self._malformed = False
        self._pattern = re.compile(re.escape(parser.start) + r"(.*?)" + re.escape(parser.end), re.DOTALL)

    def feed(self, text: str) -> str:
        """Content released by this delta; completed calls are appended to `calls`."""
        self._buffer += text
        released = []
        while True:
            if not self._in_call:
                at = self._buffer.find(self.parser.start)
                if at == -1:
                    keep = partial_marker_length(self._buffer, [self.parser.start])
                    released.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return "".join(released)
                released.append(self._buffer[:at])
                self._buffer = self._buffer[at:]
                self._in_call = True
            match = self._pattern.match(self._buffer)
            if match is None:
                return "".join(released)
            call = self.parser.parse_one(match.group(1).strip())
            if call is None or call.name not in self.tool_names:
                self._malformed = True
                released.append(match.group(0))
                log.warning("malformed tool call returned as text: %.200s", match.group(0))
            else:
                self.calls.append(call)
            self._buffer = self._buffer[match.end() :]
            self._in_call = False

    def finish(self, close_open_call: bool = False) -> tuple[str, bool]:
        """Text still held at the end of generation, and whether any call was malformed or unterminated.
        close_open_call: generation stopped at the end marker (a forced call), so supply it."""
        released = self.feed(self.parser.end) if self._in_call and close_open_call else ""
        if self._in_call:
            log.warning("unterminated tool call returned as text: %.200s", self._buffer)
            self._malformed = True
        tail, self._buffer = released + self._buffer, ""
        return tail, self._malformed
