"""Request bodies of Anthropic's Messages API, validated. As Anthropic does, an unknown field is a 400
naming it; fields that would change the reply in ways warmkv cannot honour are refused the same way, and
the ones that change nothing here (metadata, service tier, thinking budgets for models that do not think
apart) are accepted."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from warmkv.server.protocol import Strict


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class AnthropicMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class SystemBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class AnthropicTool(Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # server tools (web search, bash, ...) are Anthropic's, not ours
    cache_control: CacheControl | None = None
    eager_input_streaming: bool | None = None  # a streaming granularity hint; calls stream whole here
    strict: Literal[False] | None = Field(default=None, description="strict tool schemas are not supported")


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Thinking(Strict):
    """Accepted: the served models write no separate thinking, so any budget is kept."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputConfig(Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # accepted, as thinking is
    format: None = Field(default=None, description="structured output formats are not supported")


class CountTokensRequest(Strict):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[SystemBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = Field(default=None, discriminator="type")
    thinking: Thinking | None = None
    cache_control: CacheControl | None = None  # automatic caching: a breakpoint at the last message
    output_config: OutputConfig | None = None
    cache_salt: str | None = None  # warmkv's: isolates this request's prefix cache entries


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    speed: Literal["standard", "fast"] | None = None  # one speed here

    @field_validator("stop_sequences")
    @classmethod
    def _nonempty_stops(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value
