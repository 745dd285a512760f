"""Where each message of a rendered conversation ends, and tokenisation that keeps those ends stable.

Works for any chat template: the conversation is rendered once per message prefix, and where that text is a
prefix of the full prompt its length marks the message's end. A template that rewrites earlier turns (so a
shorter rendering is not a prefix of the longer one) simply yields no boundary there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warmkv.chat.template import encode, render_chat


@dataclass(slots=True, frozen=True)
class MessageSpan:
    index: int
    role: str
    end: int  # token offset just past the message


def message_ends(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template: str,
    text: str,
) -> list[tuple[int, str, int]]:
    """(message index, role, character offset just past it) for each message that ends inside `text`."""
    ends = []
    for index in range(len(messages)):
        prefix = render_chat(
            tokenizer, messages[: index + 1], tools, add_generation_prompt=False, chat_template=template
        )
        if text.startswith(prefix):
            ends.append((index, messages[index]["role"], len(prefix)))
    return ends


def encode_segments(
    tokenizer: Any, text: str, ends: list[tuple[int, str, int]], head: tuple[str, list[int]] | None = None
) -> tuple[list[int], list[MessageSpan]]:
    """Token ids of `text`, tokenised one message at a time, so a message boundary is always a token boundary
    and an earlier prompt stays a token prefix of a later one. `head` (text, ids) supplies the ids of a
    leading part of `text` verbatim (a turn the cache already holds); only the rest is tokenised."""
    ids, done = (list(head[1]), len(head[0])) if head else ([], 0)
    spans = []
    for index, role, end in [*ends, (-1, "", len(text))]:
        if end > done:
            ids += encode(tokenizer, text[done:end])
            done = end
        if index >= 0 and end >= (len(head[0]) if head else 0):
            spans.append(MessageSpan(index, role, len(ids)))
    return ids, spans


def message_at(spans: list[MessageSpan], token: int) -> MessageSpan | None:
    """The message a token position belongs to: the first whose end lies past it."""
    return next((span for span in spans if token < span.end), None)
