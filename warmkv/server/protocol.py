"""Request bodies of the OpenAI API, validated. Unknown fields are accepted and ignored, as OpenAI does;
known fields of the wrong type or out of range are a 400."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from warmkv.engine.sampling import SEED_RANGE


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _text_is_utf8(cls, data: Any) -> Any:
        # JSON may escape a lone surrogate ("\ud800"); no tokenizer, hash or log can encode it, so it is
        # refused here, for every string field and key of every body, known or not
        where = unencodable_text(data)
        if where is not None:
            raise PydanticCustomError(
                "unencodable_text",
                "text is not valid Unicode (it holds a lone surrogate such as \\ud800)",
                {"param": where},
            )
        return data


def unencodable_text(value: Any, path: str = "") -> str | None:
    """Dotted path of the first string (or key) in a JSON value that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        return None if value.isascii() or _encodes(value) else path or "body"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _encodes(key):
                return path or "body"
            found = unencodable_text(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unencodable_text(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Generation(_Lenient):
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # beyond OpenAI, as vLLM accepts it
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    presence_penalty: float = Field(default=0.0, ge=0, le=0, description="penalties are not supported")
    frequency_penalty: float = Field(default=0.0, ge=0, le=0, description="penalties are not supported")
    cache_salt: str | None = None  # isolates this request's prefix cache entries from other tenants'
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value
