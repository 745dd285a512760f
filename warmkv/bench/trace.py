"""Agent traces as the sequence of chat-completions requests their clients sent, and converters into it.

Formats read (detected per file):
- warmkv JSON lines: one request per line, {"session", "messages", "tools"?, "gap_s"?, "restart"?}.
- OpenAI-format request logs (JSON lines of chat-completions bodies): one request per line, no "session";
  consecutive requests that extend one another form a session.
- OpenAI-format conversations (JSON: one {"messages", "tools"?} object or a list of them): each conversation
  becomes one request per assistant message, carrying the messages before it, as its client sent them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from warmkv.errors import WarmkvError


@dataclass(slots=True)
class TraceRequest:
    session: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    gap_s: float = 0.0  # the client's idle time before this request (tool runs, the user typing)
    restart: bool = False  # the server restarts before this request
    shape: str = ""  # which synthetic shape (or source file) it comes from


def save_trace(requests: list[TraceRequest], path: Path) -> None:
    with path.open("w") as f:
        for request in requests:
            fields = {k: v for k, v in asdict(request).items() if v not in (None, 0.0, False, "")}
            f.write(json.dumps(fields) + "\n")


def load_trace(path: Path) -> list[TraceRequest]:
    try:
        text = path.read_text()
    except OSError as err:
        raise WarmkvError(f"trace {path}: {err}") from err
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    try:
        if document is not None and not (isinstance(document, dict) and "session" in document):
            conversations = document if isinstance(document, list) else [document]
            return [r for n, c in enumerate(conversations) for r in _expand(c, f"{path.stem}-{n}")]
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise WarmkvError(f"trace {path}: not a warmkv trace or OpenAI-format log ({err})") from err
    return _sessions_of(lines, path.stem)


def _expand(conversation: dict[str, Any], session: str) -> list[TraceRequest]:
    messages, tools = conversation["messages"], conversation.get("tools")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise WarmkvError(f"conversation {session} has no assistant message to replay up to")
    return [TraceRequest(session, messages[:i], tools, shape=session) for i in turns]


def _sessions_of(lines: list[dict[str, Any]], stem: str) -> list[TraceRequest]:
    requests: list[TraceRequest] = []
    last_of: dict[str, TraceRequest] = {}
    for n, line in enumerate(lines):
        session = line.get("session")
        if session is None:  # a plain request log: continue the session whose last request this extends
            session = next((s for s, r in reversed(last_of.items())
                            if line["messages"][: len(r.messages)] == r.messages), f"{stem}-{n}")  # fmt: skip
        request = TraceRequest(
            str(session), line["messages"], line.get("tools"), float(line.get("gap_s", 0.0)),
            bool(line.get("restart", False)), line.get("shape", stem),
        )  # fmt: skip
        requests.append(request)
        last_of[request.session] = request
    return requests
