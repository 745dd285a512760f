"""What the turn memory saves when a chat request's prompt is built (render, message ends, tokenise):

    python -m bench.prompt_build                              # the default model's tokenizer
    python -m bench.prompt_build --tokenizer DIR --system-tokens 20000

Three requests over the same long system prompt, each built on a turn memory that holds one earlier
request (as the server's session memory does), timed over --repeats builds (the median):
- grows: the next turn of that conversation (its text begins with the remembered turn's);
- branches: another conversation over the same system prompt (a sub-agent, a retry with another last
  message): no remembered text is a prefix of it, so it reuses ids up to the message end it shares;
- no memory: the same branch with nothing remembered, tokenised whole.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, write_result
from warmkv.chat.prompt import ChatPrompt, build_chat_prompt
from warmkv.chat.tool_calls import PARSERS
from warmkv.chat.turns import TurnMemory
from warmkv.models.loader import load_tokenizer, resolve_model_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the default model's)")
    parser.add_argument("--system-tokens", type=int, default=18000, help="system prompt size, about")
    parser.add_argument("--repeats", type=int, default=20)
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
    print_table(rows)
    command = "python -m bench.prompt_build " + " ".join(sys.argv[1:])
    print("wrote", write_result(args.name, {"command": command, "device": "cpu", "rows": rows}))


def _build(tokenizer: Any, messages: list[dict[str, Any]], turns: TurnMemory | None) -> ChatPrompt:
    template, parser = tokenizer.chat_template, PARSERS["hermes"]
    return build_chat_prompt(tokenizer, template, parser, messages, None, None, turns, "")


if __name__ == "__main__":
    main()
