"""Request bodies of OpenAI's Responses API, validated. An unknown field is a 400 naming it; a known field
that would change the reply in ways warmkv cannot honour is refused the same way; fields that change nothing
here (metadata, user, cache routing hints, reasoning settings for models that do not reason apart) are
accepted."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from warmkv.server.protocol import Strict


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    """The reply's form: free text, or JSON (under a schema) enforced by grammar on the chat path."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # json_schema's
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # strict or not, the schema is enforced

    def response_format(self) -> dict[str, Any] | None:
        """As chat completions' response_format (the chat path's form); None for free text."""
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema}}
        return None if self.type == "text" else {"type": self.type}


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(default=None, description="only the default verbosity")


class Reasoning(Strict):
    """Accepted: the served models write no separate reasoning, so there is none to summarise or limit."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(Strict):
    include_obfuscation: bool | None = None  # no obfuscation padding is ever added


class ResponsesRequest(Strict):
    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_logprobs: Literal[0] | None = Field(default=None, description="logprobs are not supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    previous_response_id: str | None = None
    store: bool = True
    truncation: Literal["disabled"] | None = Field(default=None, description="the context is never truncated")
    background: Literal[False] | None = None  # background responses are not supported
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    # the only includable that can apply: there is no reasoning, so nothing to include
    include: list[Literal["reasoning.encrypted_content"]] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint; one server's cache is shared by prefix anyway
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    cache_salt: str | None = None  # warmkv's: isolates this request's prefix cache entries
