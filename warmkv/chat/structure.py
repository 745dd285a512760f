"""The grammar a chat reply must follow: a forced tool call, or the JSON that response_format asks for.

A forced call (tool_choice required or named) is already opened in the prompt (see prompt.py); the
grammar continues from there through the call's end marker, so the reply is a call to a declared tool
whose arguments satisfy its JSON schema. With parallel_tool_calls, further calls may follow. A reply
asked to be JSON (response_format) may instead be tool calls when tools are offered on auto, as agents
that want a typed final answer still call tools along the way.
"""

from __future__ import annotations

from typing import Any

from warmkv.chat.tool_calls import ToolCallParser
from warmkv.engine.grammar import json_value, lark_string
from warmkv.errors import InvalidRequest

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI's reading


def reply_grammar(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    response_format: dict[str, Any] | None,
    parser: ToolCallParser,
    parallel_tool_calls: bool,
) -> str | None:
    """The reply's grammar (llguidance's Lark dialect), or None when the reply is free text."""
    answer_schema = response_schema(response_format)
    if isinstance(tool_choice, dict):  # the prompt ends inside the named call, before its arguments
        (tool,) = [t for t in tools or [] if t["function"]["name"] == tool_choice["function"]["name"]]
        return f"start: {_arguments(tool)} {lark_string(parser.call_tail)}"
    if tool_choice != "required" and answer_schema is None:
        return None  # free text: the usual reply, whose tools' rules are not worth writing out
    if tool_choice != "required" and (not tools or tool_choice == "none"):
        return f"start: {json_value(answer_schema)}"
    rules = _call_rules(tools or [], parser)
    more = f"({lark_string(parser.calls_separator)} call)*" if parallel_tool_calls else ""
    if tool_choice == "required":  # the prompt ends with the call's start marker
        return "\n".join([f"start: call_body {lark_string(parser.call_tail)} {more}", *rules])
    return "\n".join([f"start: {json_value(answer_schema)} | call {more}", *rules])


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a response_format asks the reply to satisfy; None for free text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")  # type: ignore[union-attr]
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("response_format.json_schema must be an object with a `schema` object")
        return spec.get("schema") or {"type": "object"}
    raise InvalidRequest(f"response_format.type must be text, json_object or json_schema, not {kind!r}")


def _call_rules(tools: list[dict[str, Any]], parser: ToolCallParser) -> list[str]:
    """`call`: one whole call to any of the tools; `call_body`: the same after its start marker."""
    bodies = [f"{lark_string(parser.naming(t['function']['name']))} {_arguments(t)}" for t in tools]
    return [
        f"call: {lark_string(parser.opening)} call_body {lark_string(parser.call_tail)}",
        f"call_body: {' | '.join(bodies)}",
    ]


def _arguments(tool: dict[str, Any]) -> str:
    return json_value(tool["function"].get("parameters") or NO_PARAMETERS)
