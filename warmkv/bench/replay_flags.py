"""Flags of `warmkv bench replay` and `warmkv bench load`, apart from the benchmarks themselves so that
`warmkv --help` stays cheap."""

from __future__ import annotations

import argparse

from warmkv.bench.peers import PEER_NAMES
from warmkv.bench.policies import DEFAULT_POLICIES
from warmkv.bench.synthetic import SHAPES

DEFAULT_LOAD_POLICIES = ("warmkv", "warmkv_gpu_only")


def _add_workload_flags(parser: argparse.ArgumentParser) -> None:
    """What both benchmarks replay, and against what: traces or synthetic shapes, a model or a --url."""
    parser.add_argument("traces", nargs="*", help="trace files (warmkv JSON lines or OpenAI-format logs)")
    shapes = ", ".join(SHAPES)
    parser.add_argument("--synthetic", help=f"comma-separated synthetic shapes, or 'all': {shapes}")
    parser.add_argument("--context", type=int, default=3000, help="synthetic sessions' context in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic traces and tool times")
    parser.add_argument("--url", help="run against this OpenAI-compatible server (…/v1) instead")
    parser.add_argument("--api-key", default="unused", help="API key sent with --url")
    parser.add_argument("--served-model", help="model name to send with --url (default: the server's first)")
    parser.add_argument("--model", help="model folder or .gguf (default: the default model)")
    parser.add_argument("--shape", help="random weights in this model's shape (e.g. qwen2.5-7b)")
    parser.add_argument(
        "--peer", help=f"comma-separated real servers to run beside warmkv on the same requests: "
        f"{', '.join(PEER_NAMES)} (built first by `python -m bench.peers`)",
    )  # fmt: skip
    parser.add_argument("--tokenizer", help="tokenizer folder, for --shape and for the oracle with --url")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--out", default="bench/results", help="directory for JSON and PNG")
    parser.add_argument(
        "--replicas", type=int, default=1, help="N > 1: warmkv on N replicas (bench load: a process per "
        "GPU), round-robin or routed, with and without the shared tier",
    )  # fmt: skip
    parser.add_argument(
        "--redis-url", help="shared tier for --replicas, its database emptied before each shared row "
        "(default: a local redis-server)",
    )  # fmt: skip


def add_replay_flags(parser: argparse.ArgumentParser) -> None:
    _add_workload_flags(parser)
    parser.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="comma-separated, or 'all' for the ablations too",
    )
    parser.add_argument("--pool-tokens", type=int, help="GPU tier (default: below the working set)")
    parser.add_argument("--host-tokens", type=int, help="host tier; default: four times the pool")
    parser.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step")
    parser.add_argument("--max-gap", type=float, default=0.0, help="longest idle gap to honour, in seconds")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots (they need matplotlib)")
    parser.add_argument("--name", help="result file name (default: replay-<device>-<model>-<context>)")


def add_load_flags(parser: argparse.ArgumentParser) -> None:
    _add_workload_flags(parser)
    parser.add_argument(
        "--copies", type=int, default=1,
        help="each session K times, as distinct conversations sharing the system prompt and tools",
    )  # fmt: skip
    parser.add_argument(
        "--tool-time", type=float, default=2.0,
        help="mean seconds between a session's requests (exponential)",
    )  # fmt: skip
    parser.add_argument("--reply-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="sessions at once, each one's end starting the next "
        "(users working through more conversations); default: every session at once",
    )  # fmt: skip
    parser.add_argument(
        "--policies",
        help=f"comma-separated policies of `bench replay` (default {','.join(DEFAULT_LOAD_POLICIES)}); "
        "with --replicas N the rows, in order (default all): 1x_all_memory, Nx_round_robin, "
        "Nx_round_robin_shared, Nx_router, Nx_router_shared",
    )  # fmt: skip
    parser.add_argument(
        "--pool-tokens",
        type=int,
        help="GPU tier, each replica's (default: a quarter of its share of the working set)",
    )
    parser.add_argument(
        "--host-tokens", type=int, help="host tier, each replica's (default: its share of the working set)"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, help="tokens per step (default: the engine's, per device)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch")
    parser.add_argument("--name", help="result file name (default: load-<device>-<model>-<sessions>)")
