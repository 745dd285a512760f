"""The assistant's reply split into content and tool calls, as it streams."""

from __future__ import annotations

import logging

from warmkv.chat.prompt import ChatPrompt
from warmkv.chat.tool_calls import ToolCall, ToolCallParser, ToolCallStreamer

log = logging.getLogger("warmkv.chat")


class ReplyReader:
    def __init__(self, prompt: ChatPrompt, parser: ToolCallParser, stops_at_call_end: bool = False) -> None:
        """stops_at_call_end: generation stops at a call's end marker (a stop string), so that a call still
        open when the reply ends is closed here."""
        self._prompt = prompt
        self._parser = parser
        self._stops_at_call_end = stops_at_call_end
        self._forced_calls: list[ToolCall] = []
        self._held = ""  # a forced call's arguments: read once the reply is complete
        self._streamer = None
        if prompt.tool_names and prompt.forced_function is None:
            self._streamer = ToolCallStreamer(parser, prompt.tool_names)
            self._streamer.feed(prompt.forced_prefix)

    @property
    def calls(self) -> list[ToolCall]:
        return self._streamer.calls if self._streamer is not None else self._forced_calls

    def feed(self, text: str) -> str:
        """Content released by this piece of the reply."""
        if self._prompt.forced_function is not None:
            self._held += text
            return ""
        if self._streamer is None:
            return text
        released = self._streamer.feed(text)
        # a forced reply is calls alone (its grammar says so): what lies between them is no content
        return "" if self._prompt.forced_prefix else released

    def finish(self) -> str:
        """Content still held when the reply ends; a malformed call comes back here as text."""
        if self._prompt.forced_function is not None:
            call = self._parser.parse_arguments(self._prompt.forced_function, self._held)
            if call is not None:
                self._forced_calls.append(call)
                return ""
            log.warning("malformed forced tool call returned as text: %.200s", self._held)
            return self._prompt.forced_prefix + self._held
        if self._streamer is None:
            return ""
        return self._streamer.finish(close_open_call=self._stops_at_call_end)[0]
