"""Request bodies of the OpenAI API, validated. Unknown fields are accepted and ignored, as OpenAI does;
known fields of the wrong type or out of range are a 400. Every field OpenAI defines is either honoured,
accepted as having no effect on the output (said so where it is declared), or refused with a 400 that
names it: none is accepted and silently ignored."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from warmkv.engine.sampling import MAX_LOGPROBS, SEED_RANGE

MAX_CHOICES = 8  # n: each choice is a sequence of its own

# fields of OpenAI's that warmkv does not implement: sending one (other than null) is a 400 naming it
_REFUSED = {
    "audio": "audio output is not supported",
    "functions": "the deprecated functions are not supported; use tools",
    "function_call": "the deprecated function_call is not supported; use tool_choice",
    "reasoning_effort": "reasoning_effort is not supported with this model",
    "verbosity": "verbosity is not supported with this model",
    "web_search_options": "web search is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix (insertion) is not supported",
}


# set while a body's outermost model validates: the models inside it are parts of what it already walked
_TEXT_CHECKED: ContextVar[bool] = ContextVar("warmkv_text_checked", default=False)


class TextChecked(BaseModel):
    """The base of every request body's models, of every API."""

    @model_validator(mode="wrap")
    @classmethod
    def _text_is_utf8(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        # JSON may escape a lone surrogate ("\ud800"); no tokenizer, hash or log can encode it, so it is
        # refused here, for every string field and key of every body, known or not. The whole body is walked
        # once, by its outermost model: walking again for each nested model cost a long body milliseconds
        if _TEXT_CHECKED.get():
            return handler(data)
        where = unencodable_text(data)
        if where is not None:
            raise PydanticCustomError(
                "unencodable_text",
                "text is not valid Unicode (it holds a lone surrogate such as \\ud800)",
                {"param": where},
            )
        checked = _TEXT_CHECKED.set(True)
        try:
            return handler(data)
        finally:
            _TEXT_CHECKED.reset(checked)


class _Lenient(TextChecked):
    model_config = ConfigDict(extra="allow")


class Strict(TextChecked):
    """Anthropic's and the Responses API's bodies: an unknown field is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")


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

    @model_validator(mode="after")
    def _content_unless_calling(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # (an assistant's may hold only calls)
            raise ValueError(f"content is required in {self.role} messages")
        return self


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


class JsonSchemaFormat(_Lenient):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # strict or not, the schema is enforced


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # required with type json_schema (chat/structure.py)


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
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)  # beyond OpenAI, as vLLM accepts it
    min_p: float = Field(default=0.0, ge=0, le=1)  # beyond OpenAI, as vLLM accepts it
    logit_bias: dict[int, float] | None = None  # token id (a string in JSON) -> bias in [-100, 100]
    cache_salt: str | None = None  # isolates this request's prefix cache entries from other tenants'
    # accepted, no effect on the output: who is asking, and what to store (nothing is stored)
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None  # one tier here
    prompt_cache_key: str | None = None  # the prefix cache is keyed by content (and cache_salt) anyway
    prompt_cache_retention: str | None = None
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("biases must be in [-100, 100]")
        return value

    @field_validator("echo", "suffix")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(_REFUSED[info.field_name])  # type: ignore[index]
        return value

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
    parallel_tool_calls: bool | None = None  # unset: several calls may come
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    modalities: list[Literal["text"]] | None = None  # audio is refused (as audio is)
    prediction: dict[str, Any] | None = None  # a latency hint; never changes the output, so it is harmless
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    # vLLM's: the reply goes on with the last message, an assistant's (a prefill), instead of a new turn
    continue_final_message: bool = False
    add_generation_prompt: bool = True  # vLLM's: false only with continue_final_message

    @field_validator("add_generation_prompt")
    @classmethod
    def _opened_unless_continued(cls, value: bool, info: ValidationInfo) -> bool:
        if not value and not info.data.get("continue_final_message"):
            raise ValueError("false is supported only with continue_final_message (a reply needs its turn)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("logprobs must be true when top_logprobs is set")
        return value

    @field_validator("audio", "functions", "function_call", "reasoning_effort", "verbosity",
                     "web_search_options")  # fmt: skip
    @classmethod
    def _refused_unless_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(_REFUSED[info.field_name])  # type: ignore[index]
        return value

    @property
    def top_logprobs_count(self) -> int | None:
        """Alternatives per token when log-probs are asked for; None when they are not."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # alternatives per token
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported (every choice generated is returned)")
        return value
