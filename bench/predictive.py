"""What predictive history prefill saves: the request that returns a tool's result, with and without it.

    python -m bench.predictive                     # the default model on this machine

Each round the model is made to call a tool (tool_choice names it, so the reply is a call); the client
"runs" the tool for --tool-seconds, then sends the history with the call and its result. Reported per
setting: the rounds where the model finished its call, cached and computed tokens of those result
requests, and their median time to first token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_name, print_table, write_result
from warmkv.cache.config import CacheConfig
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.models.loader import load_model
from warmkv.server.app import ServerSettings
from warmkv.server.embedded import EmbeddedServer, start_embedded_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CITIES = ["Paris", "Lyon", "Nice", "Lille", "Brest", "Dijon", "Rouen", "Metz"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reply-tokens", type=int, default=60, help="max_tokens of each tool call")
    parser.add_argument("--tool-seconds", type=float, default=1.0)
    args = parser.parse_args()
    model = load_model(None, torch.device("cpu"), torch.float32)
    rows = []
    for predictive in (False, True):
        config = EngineConfig(kv_pool_tokens=32768, cache=CacheConfig(kv_dir=Path(tempfile.mkdtemp())))
        server = start_embedded_server(
            LLMEngine(model, config), ServerSettings(predictive_prefill=predictive)
        )
        try:
            results = _rounds(server, model.name, args)
        finally:
            server.stop()
        cached = [r[0] for r in results]
        computed = [r[1] for r in results]
        rows.append(
            {
                "predictive prefill": "on" if predictive else "off",
                "tool rounds": len(results),
                "cached": sum(cached),
                "computed": sum(computed),
                "ttft_ms": statistics.median(r[2] for r in results) * 1000,
            }
        )
    print_table(rows)
    result = {
        "device": device_name(torch.device("cpu")),
        "model": model.name,
        "rounds": args.rounds,
        "rows": rows,
        "command": "python -m bench.predictive " + " ".join(sys.argv[1:]),
    }
    print("wrote", write_result("predictive-cpu-" + model.name.lower(), result))


def _rounds(server: EmbeddedServer, model: str, args: argparse.Namespace) -> list[tuple[int, int, float]]:
    client = server.client()
    # no system prompt: with one, the small default model rarely finishes the forced call
    messages = [{"role": "user", "content": f"What is the weather in {CITIES[0]}?"}]
    force = {"type": "function", "function": {"name": "get_weather"}}
    results = []
    for n in range(args.rounds):
        reply = client.chat.completions.create(
            model=model,
            messages=messages,
            tools=[WEATHER],
            tool_choice=force,
            temperature=0,
            max_tokens=args.reply_tokens,
        )
        calls = reply.choices[0].message.tool_calls
        if not calls:  # the small model left the call unfinished: no tool round to measure this time
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                         {"role": "user", "content": f"And in {CITIES[(n + 1) % len(CITIES)]}?"}]  # fmt: skip
            continue
        call = calls[0]
        time.sleep(args.tool_seconds)  # the client runs its tool
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'},
        ]
        started = time.perf_counter()
        answer = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER], max_tokens=1, temperature=0
        )
        ttft = time.perf_counter() - started
        usage = answer.usage
        cached = usage.prompt_tokens_details.cached_tokens
        results.append((cached, usage.prompt_tokens - cached, ttft))
        messages.append({"role": "user", "content": f"And in {CITIES[(n + 1) % len(CITIES)]}?"})
    return results


if __name__ == "__main__":
    main()
