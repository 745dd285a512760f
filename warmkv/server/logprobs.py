"""Token log-probs in the two shapes OpenAI returns them: chat's `content` entries, completions' columns.

A token's text is its own decoding; a token that ends inside a multi-byte character reads as U+FFFD
(its `bytes` are those of that text), as in vLLM.
"""

from __future__ import annotations

from typing import Any

from warmkv.engine.sampling import TokenLogprobs


def chat_logprobs(tokens: list[TokenLogprobs], tokenizer: Any) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[TokenLogprobs], tokenizer: Any, text_offset: int) -> dict[str, Any]:
    """text_offset: characters of completion text before these tokens."""
    texts = [tokenizer.decode([t.token_id]) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
