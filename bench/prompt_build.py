"""What the turn memory saves when a chat request's prompt is built (render, message ends, tokenise):

    python -m bench.prompt_build                              # the default model's tokenizer
    python -m bench.prompt_build --tokenizer DIR --system-tokens 20000

Three requests over the same long system prompt, each built on a turn memory that holds one earlier
request (as the server's session memory does), timed over --repeats builds (the median):
- grows: the next turn of that conversation (its text begins with the remembered turn's);
- branches: another conversation over the same system prompt (a sub-agent, a retry with another last
  message): no remembered text is a prefix of it, so it reuses ids up to the message end it shares;
- no memory: the same branch with nothing remembered, tokenised whole;
- grows among many: the next turn of one of --held-sessions conversations over that system prompt, each
  --held-turns turns long, all remembered as the server remembers them (a shared namespace: clients
  without a tenant); what finding its remembered turn costs among the others'.

--trace FILE (a chat-request trace, e.g. ../shared/data/traces/tau_bench_airline_gpt4o.jsonl): its requests
built in order as the server builds them (one session memory, each prompt remembered after a short reply),
--repeats times over; the median build and the chat-template renders per request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import print_table, write_result
from warmkv.bench.trace import TraceRequest, load_trace
from warmkv.chat import anchors, prompt
from warmkv.chat.prompt import ChatPrompt, build_chat_prompt
from warmkv.chat.session import ChatSession
from warmkv.chat.template import render_chat
from warmkv.chat.tool_calls import PARSERS
from warmkv.chat.turns import TurnMemory
from warmkv.models.loader import load_tokenizer, resolve_model_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    parser.add_argument("--system-tokens", type=int, default=18000, help="system prompt size, about")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trace", help="also build a chat-request trace's prompts, as the server does")
    parser.add_argument("--held-sessions", type=int, default=50, help="conversations remembered at once")
    parser.add_argument("--held-turns", type=int, default=8, help="turns of each conversation remembered")
    parser.add_argument("--name", default="prompt-build-cpu")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(resolve_model_folder(None) if args.tokenizer is None else Path(args.tokenizer))
    sentence = "You are a coding agent; read files, run the tests and explain each change. "
    per_sentence = len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    system = {"role": "system", "content": sentence * max(1, args.system_tokens // per_sentence)}
    parent = [system, {"role": "user", "content": "Fix the failing test."}]
    remembered = TurnMemory()
    first = _build(tokenizer, parent, remembered)
    remembered.remember("", first.text, first.token_ids, first.message_ends())

    def grown(n: int) -> list[dict[str, str]]:
        return [*parent, {"role": "assistant", "content": "Done."}, {"role": "user", "content": f"Step {n}."}]

    def branch(n: int) -> list[dict[str, str]]:
        return [system, {"role": "user", "content": f"Sub-task {n}: read the log."}]

    rows = []
    for case, messages, turns in (("grows", grown, remembered), ("branches", branch, remembered),
                                  ("no memory", branch, None)):  # fmt: skip
        times, tokens = [], 0
        for n in range(args.repeats):
            started = time.perf_counter()
            tokens = len(_build(tokenizer, messages(n), turns).token_ids)
            times.append(time.perf_counter() - started)
        rows.append({"request": case, "prompt_tokens": tokens, "build_ms": 1000 * statistics.median(times)})
    rows.append(_among_many(tokenizer, system, args.held_sessions, args.held_turns, args.repeats))
    print_table(rows)
    result: dict[str, Any] = {"rows": rows}
    if args.trace:
        result["trace"] = _trace_row(tokenizer, load_trace(Path(args.trace)), args.repeats)
        print_table([result["trace"]])
    command = "python -m bench.prompt_build " + " ".join(sys.argv[1:])
    print("wrote", write_result(args.name, {"command": command, "device": "cpu", **result}))


def _trace_row(tokenizer: Any, requests: list[TraceRequest], repeats: int) -> dict[str, Any]:
    reply = tokenizer("OK.", add_special_tokens=False)["input_ids"]
    renders = 0

    def counted(*args: Any, **kwargs: Any) -> str:
        nonlocal renders
        renders += 1
        return render_chat(*args, **kwargs)

    times: list[float] = []
    tokens: list[int] = []
    with (
        mock.patch.object(anchors, "render_chat", counted),
        mock.patch.object(prompt, "render_chat", counted),
    ):
        for _ in range(repeats):
            session, renders = ChatSession(tokenizer, tokenizer.chat_template, PARSERS["hermes"]), 0
            for request in requests:
                started = time.perf_counter()
                built = session.prompt(request.messages, request.tools, None, "")
                times.append(time.perf_counter() - started)
                tokens.append(len(built.token_ids))
                session.after_reply("", built, reply, request.messages, request.tools, [])
    return {
        "trace requests": len(requests), "median prompt_tokens": statistics.median(tokens),
        "build_ms": 1000 * statistics.median(times), "renders_per_request": renders / len(requests),
    }  # fmt: skip


def _among_many(tokenizer: Any, system: dict[str, str], sessions: int, turns: int,
                repeats: int) -> dict[str, Any]:  # fmt: skip
    """The next turn of one conversation among `sessions` remembered ones, each `turns` turns long."""
    session = ChatSession(tokenizer, tokenizer.chat_template, PARSERS["hermes"])
    reply = tokenizer("Done.", add_special_tokens=False)["input_ids"]
    histories = {n: [system, {"role": "user", "content": f"Task {n}."}] for n in range(sessions)}
    for step in range(turns):
        for history in histories.values():
            built = session.prompt(history, None, None, "")
            session.after_reply("", built, reply, history, None, [])
            history += [{"role": "assistant", "content": "Done."},
                        {"role": "user", "content": f"Step {step}."}]  # fmt: skip
    times, tokens = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = len(session.prompt(histories[0], None, None, "").token_ids)
        times.append(time.perf_counter() - started)
    return {"request": f"grows among {sessions} x {turns} turns", "prompt_tokens": tokens,
            "build_ms": 1000 * statistics.median(times)}  # fmt: skip


def _build(tokenizer: Any, messages: list[dict[str, Any]], turns: TurnMemory | None) -> ChatPrompt:
    template, parser = tokenizer.chat_template, PARSERS["hermes"]
    return build_chat_prompt(tokenizer, template, parser, messages, None, None, turns, "")


if __name__ == "__main__":
    main()
