"""What `warmkv bench load`'s client costs the benchmark's own process, per request, against a server that
answers at once (an in-process mock of a streamed chat completion): the share of a load run's CPU that is
not the server's.

    python -m bench.load_client TRACE [--reply-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from bench.common import print_table, write_result
from warmkv.bench.load import Endpoint, LoadShape, run_load
from warmkv.bench.trace import load_trace


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("trace", help="a trace file (its requests are sent one after another)")
    parser.add_argument("--reply-tokens", type=int, default=32, help="streamed chunks per reply")
    parser.add_argument("--name", default="load-client-cpu")
    args = parser.parse_args(argv)
    requests = load_trace(Path(args.trace))
    server = httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=_events(args.reply_tokens)))  # fmt: skip
    shape = LoadShape(tool_time_s=0, reply_tokens=args.reply_tokens, concurrency=1)
    run_load([Endpoint("http://mock/v1")], "m", requests[:5], shape, transport=server)  # warm-up
    run = run_load([Endpoint("http://mock/v1")], "m", requests, shape, transport=server)
    body_kb = sum(len(json.dumps({"messages": r.messages, "tools": r.tools})) for r in requests) / len(
        requests
    )
    rows = [{"requests": len(requests), "mean_body_kb": body_kb / 1000, "reply_chunks": args.reply_tokens,
             "client_cpu_ms_per_request": 1000 * run.process_cpu_s / len(requests)}]  # fmt: skip
    print_table(rows)
    command = "python -m bench.load_client " + " ".join(sys.argv[1:])
    print("wrote", write_result(args.name, {"command": command, "device": "cpu", "rows": rows}))


def _events(chunks: int) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
    counts = {"prompt_tokens": 100, "completion_tokens": chunks, "total_tokens": 100 + chunks}
    usage = {"choices": [], "usage": counts | {"prompt_tokens_details": {"cached_tokens": 50}}}
    events = [delta] * chunks + [usage]
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


if __name__ == "__main__":
    main()
