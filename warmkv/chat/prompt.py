"""From a chat request to the prompt text the model continues."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warmkv.chat.anchors import MessageSpan, encode_segments, message_ends
from warmkv.chat.messages import for_template, text_of
from warmkv.chat.template import render_chat
from warmkv.chat.tool_calls import ToolCallParser
from warmkv.chat.turns import TurnMemory
from warmkv.errors import InvalidRequest


@dataclass(slots=True)
class ChatPrompt:
    text: str  # rendered conversation, ending with the assistant's turn opened (and any forced prefix)
    forced_prefix: str  # start of the assistant's reply written by us, to force a tool call
    forced_function: str | None  # tool_choice named this function: the reply is its arguments
    tool_names: set[str]  # tool calls are read out of the reply when this is not empty
    token_ids: list[int]
    spans: list[MessageSpan]  # where each message ends, in tokens (those past a remembered head)
    text_ends: list[int]  # where every message ends, in characters

    def message_ends(self) -> list[tuple[int, int | None]]:
        """(character, token) offsets just past each message, where a later prompt may branch off; the
        token offset is None inside the remembered turn this prompt began with (that turn knows it)."""
        tokens = {span.text_end: span.end for span in self.spans}
        return [(end, tokens.get(end)) for end in self.text_ends]


def build_chat_prompt(
    tokenizer: Any,
    template: str,
    parser: ToolCallParser,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    turns: TurnMemory | None = None,
    namespace: str = "",
    add_generation_prompt: bool = True,
    stable_tokens: bool = True,
    continue_final: bool = False,
) -> ChatPrompt:
    """`stable_tokens` False tokenises the text whole, as a text-keyed cache would (no message spans).
    `continue_final`: the reply goes on with the last message, an assistant's (a prefill)."""
    if continue_final and messages[-1:] and messages[-1].get("role") != "assistant":
        raise InvalidRequest("only an assistant message can be continued: the last message is not one")
    if continue_final and messages[-1:] and not text_of(messages[-1].get("content")):
        raise InvalidRequest("the last message has no text to continue (its tool calls cannot be)")
    template_messages, template_tools = for_template(messages, tools, template, parser)
    text = render_chat(tokenizer, template_messages, template_tools, add_generation_prompt, template,
                       continue_final)  # fmt: skip
    prefix = _forced_prefix(tools, tool_choice, parser)
    if continue_final and prefix:
        raise InvalidRequest("a reply that continues the assistant's message cannot be forced to call a tool")
    forced = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    names = {t["function"]["name"] for t in tools or []} if tool_choice != "none" else set()
    ends = []
    if stable_tokens:
        ends = message_ends(tokenizer, template_messages, template_tools, template, text,
                            add_generation_prompt, continue_final)  # fmt: skip
    ends_at = [end for _, _, end in ends]
    head = turns.longest_prefix_of(namespace, text + prefix, ends_at) if turns and stable_tokens else None
    token_ids, spans = encode_segments(tokenizer, text + prefix, ends, head)
    return ChatPrompt(text + prefix, prefix, forced, names, token_ids, spans, ends_at)


def _forced_prefix(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, parser: ToolCallParser
) -> str:
    """tool_choice required / named: open the call ourselves so the model can only complete it."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if not tools:
        raise InvalidRequest("tool_choice asks for a tool call but the request has no tools")
    if tool_choice == "required":
        return parser.opening
    name = tool_choice["function"]["name"]  # type: ignore[index]
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequest(f"tool_choice names the function {name!r}, which is not among the tools")
    return parser.opening + parser.naming(name)
