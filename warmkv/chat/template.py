"""Chat-template rendering, done by transformers so the prompt is exactly what the model was trained on."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from warmkv.errors import InvalidRequest


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> str:
    if not messages:
        raise InvalidRequest("messages must not be empty")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tokenize=False,
        )
    except (TemplateError, ValueError, TypeError, KeyError) as err:
        raise InvalidRequest(f"the chat template could not render these messages: {err}") from err


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; the template already placed every special token it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, in one call (empty texts give no ids)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
