"""Synthetic agent traces in the shapes real agents produce, scaled to a context length in tokens.

Shapes: a tool loop with large results; sub-agents interleaved with their parent; a server restart in the
middle of a session; an early block of the system prompt rewritten between sessions; many single-turn
requests on one system prompt. Text is seeded pseudo-random words (about 1.3 tokens each), so runs repeat.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from warmkv.bench.trace import TraceRequest

TOKENS_PER_WORD = 1.3
WORDS = [
    "config", "parser", "module", "request", "handler", "cache", "block", "token", "server", "client",
    "agent", "error", "value", "index", "buffer", "stream", "session", "thread", "queue", "retry", "timeout",
    "schema", "field", "record", "table", "column", "commit", "branch", "merge", "diff", "patch", "build",
    "test", "deploy", "metric", "trace", "span", "event", "logger", "format", "encode", "decode",
]  # fmt: skip
PATH_PARAMETER = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": name.replace("_", " "),
                                      "parameters": PATH_PARAMETER}}
    for name in ("list_dir", "read_file", "run_tests", "search_code")
]  # fmt: skip


class _Text:
    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def words(self, tokens: int) -> str:
        count = max(1, int(tokens / TOKENS_PER_WORD))
        return " ".join(self.random.choice(WORDS) for _ in range(count))


def _system(text: _Text, tokens: int, status: str = "M src/app.py") -> str:
    # an early, volatile block (git status) before the long stable instructions: what agents do
    return f"You are a coding agent.\nRepository status:\n{status}\nInstructions:\n{text.words(tokens)}"


def _call(n: int, name: str = "read_file") -> tuple[dict, str]:
    call_id = f"call_{n}"
    arguments = json.dumps({"path": f"src/module_{n}.py"})
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}, call_id


def tool_loop(text: _Text, context: int, session: str, rounds: int = 6, system: str | None = None,
              restart_at: int | None = None) -> list[TraceRequest]:  # fmt: skip
    system = system or _system(text, context // 4)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text.words(40)}]
    result_tokens = (context * 5 // 8) // rounds
    requests = [TraceRequest(session, list(messages), TOOLS)]
    for n in range(rounds):
        call, call_id = _call(n)
        messages += [call, {"role": "tool", "tool_call_id": call_id, "content": text.words(result_tokens)}]
        requests.append(TraceRequest(session, list(messages), TOOLS, gap_s=2.0, restart=n == restart_at))
    return requests


def subagents(text: _Text, context: int, session: str) -> list[TraceRequest]:
    system = _system(text, context // 4)
    parent = tool_loop(text, context, f"{session}-parent", rounds=4, system=system)
    children = [tool_loop(text, context // 2, f"{session}-sub{k}", rounds=3,
                          system=system + f"\nYou are sub-agent {k}: answer only your sub-task.")
                for k in range(2)]  # fmt: skip
    interleaved = []
    for step in range(max(len(parent), *(len(c) for c in children))):
        for requests in (parent, *children):
            if step < len(requests):
                interleaved.append(requests[step])
    return interleaved


def restart(text: _Text, context: int, session: str) -> list[TraceRequest]:
    return tool_loop(text, context, session, restart_at=3)


def rewrite(text: _Text, context: int, session: str) -> list[TraceRequest]:
    instructions = text.words(context // 3)
    requests = []
    for k, status in enumerate(("M src/app.py", "M src/db.py", "M src/db.py")):
        system = f"You are a coding agent.\nRepository status:\n{status}\nInstructions:\n{instructions}"
        requests += tool_loop(text, context // 2, f"{session}-{k}", rounds=2, system=system)
    return requests


def single_turns(text: _Text, context: int, session: str, count: int = 10) -> list[TraceRequest]:
    system = _system(text, context // 3)
    return [
        TraceRequest(f"{session}-{k}", [{"role": "system", "content": system},
                                        {"role": "user", "content": text.words(60)}], TOOLS)
        for k in range(count)
    ]  # fmt: skip


SHAPES: dict[str, Callable[[_Text, int, str], list[TraceRequest]]] = {
    "tool_loop": tool_loop,
    "subagents": subagents,
    "restart": restart,
    "rewrite": rewrite,
    "single_turns": single_turns,
}


def synthetic_trace(shapes: list[str], context: int, seed: int = 0) -> list[TraceRequest]:
    text = _Text(seed)
    requests = []
    for shape in shapes:
        for request in SHAPES[shape](text, context, shape):
            request.shape = shape
            requests.append(request)
    return requests
