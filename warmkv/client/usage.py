"""Cache usage as each provider reports it, read into one shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    extra = getattr(obj, "model_extra", None)  # openai's pydantic models keep unknown fields here
    if value is None and extra:
        value = extra.get(name)
    return value


@dataclass(slots=True, frozen=True)
class CacheUsage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    cache_write_tokens: int = 0  # Anthropic's cache_creation_input_tokens

    @property
    def hit_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def read_usage(usage: Any) -> CacheUsage | None:
    """OpenAI `prompt_tokens_details.cached_tokens`, DeepSeek `prompt_cache_hit_tokens` /
    `prompt_cache_miss_tokens`, or Anthropic `cache_read_input_tokens` / `input_tokens`."""
    if usage is None:
        return None
    completion = _field(usage, "completion_tokens") or _field(usage, "output_tokens") or 0
    hit, miss = _field(usage, "prompt_cache_hit_tokens"), _field(usage, "prompt_cache_miss_tokens")
    if hit is not None and miss is not None:
        return CacheUsage(hit + miss, hit, completion)
    read = _field(usage, "cache_read_input_tokens")
    if read is not None:  # Anthropic: input_tokens counts only what was neither read nor written
        written = _field(usage, "cache_creation_input_tokens") or 0
        return CacheUsage((_field(usage, "input_tokens") or 0) + read + written, read, completion, written)
    prompt = _field(usage, "prompt_tokens")
    if prompt is None:
        return None
    cached = _field(_field(usage, "prompt_tokens_details"), "cached_tokens") or 0
    return CacheUsage(prompt, cached, completion)
