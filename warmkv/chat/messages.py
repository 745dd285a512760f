"""OpenAI chat messages made ready for a model's chat template, tools included.

Templates that know tools get them as transformers passes them (`tools=`, assistant `tool_calls` with
arguments as a mapping, `tool` role messages). For templates that know none, the documented fallback:
the tool list joins the system message in the Hermes format, earlier calls are written as
`<tool_call>{...}</tool_call>` in the assistant's text, and tool results come back as a user turn
wrapped in `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import json
from typing import Any

from warmkv.chat.tool_calls import ToolCallParser
from warmkv.errors import InvalidRequest

FALLBACK_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_knows_tools(template: str) -> bool:
    return "tools" in template or "tool_calls" in template


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidRequest(f"content parts of type {part.get('type')!r} are not supported (text only)")
        parts.append(part.get("text", ""))
    return "".join(parts)


def for_template(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template: str,
    parser: ToolCallParser,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools to hand to the template."""
    if template_knows_tools(template):
        return [_native(m) for m in messages], tools
    return _fallback(messages, tools, parser), None


def _native(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if v is not None}
    out["content"] = text_of(message.get("content"))
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                **call,
                "function": {**call["function"], "arguments": _as_mapping(call["function"]["arguments"])},
            }
            for call in message["tool_calls"]
        ]
    return out


def _as_mapping(arguments: str | dict) -> dict | str:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


def _fallback(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, parser: ToolCallParser
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role, text = message["role"], text_of(message.get("content"))
        if role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        elif role == "developer":
            role = "system"
        if message.get("tool_calls"):
            calls = [
                parser.render_call(c["function"]["name"], _as_json(c["function"]["arguments"]))
                for c in message["tool_calls"]
            ]
            text = "\n".join(filter(None, [text, *calls]))
        out.append({"role": role, "content": text})
    if tools:
        preamble = FALLBACK_TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _as_json(arguments: str | dict) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
