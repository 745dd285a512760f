"""Chat-template rendering, done by transformers so the prompt is exactly what the model was trained on."""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import TemplateError

from warmkv.errors import InvalidRequest


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    continue_final: bool = False,
) -> str:
    """`continue_final`: the text ends inside the last message, left open for the model to go on with
    (an assistant prefill); no generation prompt then."""
    if not messages:
        raise InvalidRequest("messages must not be empty")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final,
            chat_template=chat_template,
            tokenize=False,
        )
    except (TemplateError, ValueError, TypeError, KeyError) as err:
        raise InvalidRequest(f"the chat template could not render these messages: {err}") from err


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; the template already placed every special token it wants."""
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, in one call (empty texts give no ids). A fast tokenizer's own encoder is
    called without the character offsets transformers' wrapper has it track, which a prompt never uses: a
    tau-bench turn's new segments took 0.19 ms this way against 0.31 through the wrapper
    (bench/results/tokenise-cpu-smollm2-tau-bench-segments.json)."""
    if not texts:
        return []
    backend = _offsetless_encoder(tokenizer)
    # the wrapper sets these before each call and leaves them so: a call of someone else's may have changed
    # them since (truncation, padding, special tokens split as text)
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return _direct(backend, texts)
    return _wrapped(tokenizer, texts)


def _wrapped(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _direct(backend: Any, texts: list[str]) -> list[list[int]]:
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


# a probe of what a wrapper could do on its own: special tokens, spaces, newlines, digits, non-ASCII
_PROBE = [" <|im_start|>user\n  Hello 12345 wörld\t😀<|im_end|>\n", "x", " \n\n ", "<s></s>[INST]"]


@functools.lru_cache(maxsize=8)  # (a server has one tokenizer; two threads may both probe it, harmlessly)
def _offsetless_encoder(tokenizer: Any) -> Any:
    """The tokenizers-library encoder behind a fast tokenizer, if it tokenises as the wrapper does; None
    otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    return backend if _direct(backend, _PROBE) == _wrapped(tokenizer, _PROBE) else None
