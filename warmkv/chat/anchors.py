"""Where each message of a rendered conversation ends, in tokens.

Works for any chat template: the conversation is rendered once per message prefix, and where that text is a
prefix of the full prompt, its length in characters is mapped to a token offset. A template that rewrites
earlier turns (so a shorter rendering is not a prefix of the longer one) simply yields no offset there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warmkv.chat.template import render_chat


@dataclass(slots=True, frozen=True)
class MessageSpan:
    index: int
    role: str
    end: int  # token offset just past the message


def message_spans(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template: str,
    prompt_text: str,
) -> list[MessageSpan]:
    offsets = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = []
    for index in range(len(messages)):
        text = render_chat(
            tokenizer, messages[: index + 1], tools, add_generation_prompt=False, chat_template=template
        )
        if not prompt_text.startswith(text):
            continue
        end = next((t for t, (start, _) in enumerate(offsets) if start >= len(text)), len(offsets))
        spans.append(MessageSpan(index, messages[index]["role"], end))
    return spans


def message_at(spans: list[MessageSpan], token: int) -> MessageSpan | None:
    """The message a token position belongs to: the first whose end lies past it."""
    return next((span for span in spans if token < span.end), None)
