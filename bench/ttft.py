"""Where the time to first token of a cache hit goes, stage by stage, beside the physical limit.

    python -m bench.ttft                       # default model on this machine, small sizes
    python -m bench.ttft --shape qwen2.5-7b --tokenizer DIR --device cuda --cached-tokens 32640 \\
        --trace ../shared/data/traces/tau_bench_airline_gpt4o.jsonl

Synthetic hit: a conversation opens with a --cached-tokens system prompt; each later request resends the
history with a short reply and a new user message of --new-tokens, so its history is a live hit. Each
stage of such a request runs on its own through the public APIs the server uses (request parsing, chat
rendering, message offsets and tokenisation, block hashing, lookup, tier loads, the engine's first step,
sampling); then the same requests go through the HTTP server (streamed, `max_tokens: 1`), timed by the
client. What the end-to-end time holds beyond the stages is HTTP, the queues between event loop and
engine thread, and the first byte out.

Trace (--trace, JSON lines of chat requests): replayed once to compile every kernel shape it needs, then
through the HTTP server with every tier on and with the GPU tier alone, two rounds each (tiers, GPU
only, GPU only, tiers), the pool holding every prompt (so the lower tiers bring nothing and may only cost).
Each request's limit is the same one pass over its own cached and new tokens.

Steps (--step-streams): decoding streams with a prefill arriving every few steps, pool small enough to
evict, with the host and disk tiers (write-through, demotion) and with the GPU tier alone, two rounds
each in that order: the tiers must not lengthen a step beyond how far one configuration's rounds differ.

The limit, measured in the same run: every weight and the whole KV read once at the device's copy
bandwidth, plus the new tokens' FLOPs at its matmul rate (bench/common.py, HardwareLimits).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS,
    HardwareLimits,
    add_model_flags,
    device_name,
    print_table,
    synchronize,
    write_result,
)
from warmkv.bench.oracle import oracle_hits
from warmkv.bench.replay import TurnResult, replay_embedded
from warmkv.bench.trace import TraceRequest, load_trace
from warmkv.cache.config import CacheConfig, LoadPolicy
from warmkv.chat.messages import for_template
from warmkv.chat.prompt import build_chat_prompt
from warmkv.chat.template import encode, render_chat
from warmkv.chat.tool_calls import PARSERS
from warmkv.chat.turns import TurnMemory
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams, sample_batch
from warmkv.models.loader import LoadedModel
from warmkv.models.random_init import model_or_shape
from warmkv.server.protocol import ChatCompletionRequest

STAGES = ("parse", "render", "offsets + tokenise", "hash", "lookup", "tier loads", "prefill + step", "sample")


def main() -> None:
    args = _parser().parse_args()
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    model = model_or_shape(args.model, args.shape, args.tokenizer, device, dtype)
    limits = HardwareLimits.measure(device, dtype)
    result: dict[str, Any] = {
        "device": device_name(device), "model": model.name, "dtype": str(dtype).removeprefix("torch."),
        "copy_bytes_per_s": limits.copy_bytes_per_s, "matmul_flop_per_s": limits.matmul_flop_per_s,
        "command": "python -m bench.ttft " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    requests = synthetic_requests(
        model.tokenizer, args.cached_tokens, args.new_tokens, args.repeats, args.seed
    )
    result["synthetic"] = synthetic_breakdown(model, args, requests, limits)
    result |= {
        "ttft_live_hit_ms": result["synthetic"]["http_ttft_ms"],
        "ttft_live_hit_limit_ms": result["synthetic"]["limit_ms"],
        "ttft_live_hit_fraction_of_limit": result["synthetic"]["fraction_of_limit"],
        "tiers_over_gpu_only_ttft": result["synthetic"]["tiers_over_gpu_only_ttft"],
    }
    trace = Path(args.trace) if args.trace else None
    requests = load_trace(trace)[: args.trace_requests] if trace is not None and trace.exists() else []
    if requests:
        result["trace"] = trace_replay(model, args, requests, limits)
        result["tiers_over_gpu_only_ttft"] = result["trace"]["tiers_over_gpu_only_ttft"]
        result["trace_median_ttft_ms"] = result["trace"]["median_ttft_ms"]
        result["trace_median_ttft_over_limit"] = result["trace"]["median_ttft_over_limit"]
        result["trace_rounds_apart"] = result["trace"]["rounds_apart"]
    elif trace is not None:
        print(f"skipping the trace replay: {trace} does not exist or holds no chat request")
    if args.step_streams:
        result["steps"] = step_times(model, args)
        result["tiers_over_gpu_only_step"] = result["steps"]["tiers_over_gpu_only_step"]
        result["step_rounds_apart"] = result["steps"]["rounds_apart"]
    summary = {k: v for k, v in result.items() if isinstance(v, float)}
    print_table([{"measure": k, "value": f"{v:.4g}"} for k, v in summary.items()])
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{result['device']}-{model.name}-{args.cached_tokens}".lower())
    print("wrote", write_result(f"ttft-{slug.strip('-')}", result, Path(args.out)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(parser)
    parser.add_argument("--cached-tokens", type=int, default=2048, help="the synthetic hit's cached prefix")
    parser.add_argument("--new-tokens", type=int, default=64, help="the synthetic hit's new user message")
    parser.add_argument("--repeats", type=int, default=5, help="synthetic hits measured (medians reported)")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="prefill chunk of every engine")
    parser.add_argument("--trace", help="chat-request trace to replay, e.g. ../shared/data/traces/*.jsonl")
    parser.add_argument("--trace-requests", type=int, help="replay only the first N requests")
    parser.add_argument(
        "--step-streams", type=int, default=4, help="decoding streams in the step test (0: off)"
    )
    parser.add_argument(
        "--step-prompt", type=int, default=256, help="prompt tokens of each step-test request"
    )
    parser.add_argument("--steps", type=int, default=40, help="steps timed per configuration and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    return parser


# -- the synthetic hit, stage by stage -------------------------------------------------------------------


def synthetic_requests(tokenizer: Any, cached: int, new: int, repeats: int, seed: int) -> list[TraceRequest]:
    """An agent-style conversation whose last request has about `cached` tokens of history: a system
    prompt, then turns that each resend the history with a short reply and a new user message of about
    `new` tokens. The first request caches the system prompt, the second warms the hit path up, `repeats`
    more are measured."""
    rng = random.Random(seed)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(1000, 6000)) if w.isalpha()]

    def text(tokens: int) -> str:
        ids = encode(tokenizer, " ".join(rng.choice(words) for _ in range(tokens)))
        return tokenizer.decode(ids[:tokens])

    turn_tokens = new + 16  # the message, its reply "OK." and the template's markers around both
    system = text(max(64, cached - (repeats + 1) * turn_tokens))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text(new)}]
    requests = [TraceRequest("synthetic", list(messages), shape="synthetic")]
    for _ in range(repeats + 1):
        messages += [{"role": "assistant", "content": "OK."}, {"role": "user", "content": text(new)}]
        requests.append(TraceRequest("synthetic", list(messages), shape="synthetic"))
    return requests


def synthetic_breakdown(model: LoadedModel, args: argparse.Namespace, requests: list[TraceRequest],
                        limits: HardwareLimits) -> dict[str, Any]:  # fmt: skip
    pool_tokens = 2 * (args.cached_tokens + args.new_tokens * (args.repeats + 2)) + 1024
    engine = LLMEngine(model, _engine_config(args, pool_tokens, tiers=True, kv_dir=None))
    turns = TurnMemory()  # the server's memory of recent turns, for stable tokens
    stages = _on_fresh_thread(lambda: [_stage_times(engine, r, turns) for r in requests])
    engine.close()
    hits = stages[2:]  # the first request caches the system prompt, the second warms up the hit path
    medians = {stage: statistics.median(s[stage] for s in hits) for stage in (*STAGES, "engine")}
    cached = int(statistics.median(s["cached_tokens"] for s in hits))
    new = int(statistics.median(s["prompt_tokens"] - s["cached_tokens"] for s in hits))
    http = {name: _replay(model, args, requests, name, pool_tokens) for name in ("tiers", "gpu_only")}
    http_ttft = {name: statistics.median(t.ttft_s for t in turns[2:]) * 1000 for name, turns in http.items()}
    limit_ms = limits.forward_seconds(model, new, cached) * 1000
    staged = sum(medians[stage] for stage in STAGES)
    rows = [
        {"stage": stage, "ms": medians[stage], "share": medians[stage] / http_ttft["tiers"]}
        for stage in STAGES
    ]
    rows.append({"stage": "HTTP, queues, first byte (the rest)", "ms": http_ttft["tiers"] - staged,
                 "share": (http_ttft["tiers"] - staged) / http_ttft["tiers"]})  # fmt: skip
    rows += [{"stage": "end to end (HTTP, all tiers)", "ms": http_ttft["tiers"], "share": 1.0},
             {"stage": "end to end (HTTP, GPU tier only)", "ms": http_ttft["gpu_only"], "share": "-"},
             {"stage": "engine alone (hash .. sample)", "ms": medians["engine"], "share": "-"},
             {"stage": "physical limit", "ms": limit_ms, "share": "-"}]  # fmt: skip
    print(f"\nsynthetic live hit: {cached} cached + {new} new tokens, median of {len(hits)}")
    print_table(rows)
    return {
        "cached_tokens": cached, "new_tokens": new, "stages_ms": medians, "http_ttft_ms": http_ttft["tiers"],
        "http_ttft_gpu_only_ms": http_ttft["gpu_only"], "engine_ttft_ms": medians["engine"],
        "limit_ms": limit_ms, "fraction_of_limit": limit_ms / http_ttft["tiers"],
        "engine_fraction_of_limit": limit_ms / medians["engine"],
        "tiers_over_gpu_only_ttft": http_ttft["tiers"] / http_ttft["gpu_only"],
        "http_cached_tokens": [t.cached_tokens for t in http["tiers"][2:]],
    }  # fmt: skip


def _stage_times(engine: LLMEngine, request: TraceRequest, turns: TurnMemory) -> dict[str, float]:
    """One request's stages in milliseconds, each as the server runs it, then the engine's own first step."""
    tokenizer, template, parser = (
        engine.model.tokenizer,
        engine.model.tokenizer.chat_template,
        PARSERS["hermes"],
    )
    cache, device = engine.prefix_cache, engine.model.device
    assert cache is not None
    body = json.dumps({"model": engine.model.name, "messages": request.messages, "tools": request.tools,
                       "max_tokens": 1, "stream": True})  # fmt: skip
    times: dict[str, float] = {}
    parsed = _timed(times, "parse", lambda: ChatCompletionRequest.model_validate_json(body))
    messages = [m.model_dump(exclude_none=True) for m in parsed.messages]
    tools = [t.model_dump(exclude_none=True) for t in parsed.tools] if parsed.tools else None
    template_messages, template_tools = for_template(messages, tools, template, parser)
    _timed(times, "render", lambda: render_chat(tokenizer, template_messages, template_tools, True, template))
    prompt = _timed(
        times, "offsets + tokenise",
        lambda: build_chat_prompt(tokenizer, template, parser, messages, tools, None, turns, ""),
    )  # fmt: skip
    times["offsets + tokenise"] -= times["render"]  # build_chat_prompt renders too
    ids = prompt.token_ids
    keys = _timed(times, "hash", lambda: cache.chain("", ids[:-1]))
    hit = _timed(times, "lookup", lambda: cache.lookup(keys), device)
    times["tier loads"] = hit.load_seconds * 1000
    times["lookup"] -= times["tier loads"]
    hit.truncate(0, engine.pool)  # give the blocks back: the engine looks up again below
    synchronize(device)
    start = time.perf_counter()
    first = next(iter(engine.generate(ids, SamplingParams(max_tokens=1))))
    synchronize(device)
    times["engine"] = (time.perf_counter() - start) * 1000
    logits = torch.randn(engine.model.config.vocab_size, device=device)
    sample = lambda: sample_batch([logits], [SamplingParams(max_tokens=1)], [None])  # noqa: E731
    sample()  # warm-up
    _timed(times, "sample", sample, device)
    engine_rest = times["hash"] + times["lookup"] + times["tier loads"] + times["sample"]
    times["prefill + step"] = times["engine"] - engine_rest
    turns.remember("", prompt.text, ids)  # what the server remembers after a turn
    times["prompt_tokens"], times["cached_tokens"] = len(ids), first.sequence.num_cached
    return times


def _timed(
    times: dict[str, float], stage: str, run: Callable[[], Any], device: torch.device | None = None
) -> Any:
    if device is not None:
        synchronize(device)
    start = time.perf_counter()
    out = run()
    if device is not None:
        synchronize(device)
    times[stage] = (time.perf_counter() - start) * 1000
    return out


# -- HTTP replays: every tier against the GPU tier alone ---------------------------------------------------


def _replay(model: LoadedModel, args: argparse.Namespace, requests: list[TraceRequest], name: str,
            pool_tokens: int) -> list[TurnResult]:  # fmt: skip
    tiers = ["--host-cache-tokens", str(pool_tokens)] if name == "tiers" else ["--host-cache-tokens", "0",
                                                                              "--no-disk-cache"]  # fmt: skip
    flags = ["--kv-pool-tokens", str(pool_tokens), "--max-batch-tokens", str(args.max_batch_tokens),
             "--max-num-seqs", "8", "--device", args.device, "--dtype", args.dtype, "--kv-load", "always",
             *tiers]  # fmt: skip
    return replay_embedded(model, flags, requests, 0.0, name)


def trace_replay(model: LoadedModel, args: argparse.Namespace, requests: list[TraceRequest],
                 limits: HardwareLimits) -> dict[str, Any]:  # fmt: skip
    tokenizer, template = model.tokenizer, model.tokenizer.chat_template
    prompts = [build_chat_prompt(tokenizer, template, PARSERS["hermes"], r.messages, r.tools, None).token_ids
               for r in requests]  # fmt: skip
    unique = sum(len(p) for p in prompts) - sum(oracle_hits(prompts))
    pool_tokens = -(-(unique + max(len(p) for p in prompts) + 1024) // 16) * 16  # holds every prompt
    # a first pass compiles the kernels for every shape the trace needs: otherwise the first configuration
    # replayed pays for it (seconds on a GPU) and the second does not
    _replay(model, args, requests, "warm-up", pool_tokens)
    # two rounds each, alternating, so drifting machine load falls on both; how far one configuration's two
    # rounds differ is the noise their ratio is read against
    runs: dict[str, list[list[TurnResult]]] = {"tiers": [], "gpu_only": []}
    for name in ("tiers", "gpu_only", "gpu_only", "tiers"):  # (a steady drift falls on both alike)
        runs[name].append(_replay(model, args, requests, name, pool_tokens))
    rows, out = [], {"requests": len(requests), "pool_tokens": pool_tokens}
    for name, rounds in runs.items():
        turns = [turn for replay in rounds for turn in replay]
        round_means = [statistics.mean(t.ttft_s * 1000 for t in replay) for replay in rounds]
        ttfts = [t.ttft_s * 1000 for t in turns]
        limit = [limits.forward_seconds(model, t.prompt_tokens - t.cached_tokens, t.cached_tokens) * 1000
                 for t in turns]  # fmt: skip
        cached = 100 * sum(t.cached_tokens for t in turns) / sum(t.prompt_tokens for t in turns)
        row = {"tiers": name, "requests replayed": len(turns), "cached %": cached,
               "mean TTFT ms": statistics.mean(ttfts),
               "median TTFT ms": statistics.median(ttfts), "median limit ms": statistics.median(limit),
               "median TTFT / limit": statistics.median(ttfts) / statistics.median(limit),
               "rounds apart %": _percent_apart(round_means)}  # fmt: skip
        rows.append(row)
        out[name] = row | {"ttft_ms": ttfts, "limit_ms": limit}
    print(f"\ntrace replay: {len(requests)} requests, twice per configuration, pool {pool_tokens} tokens")
    print_table(rows)
    tiers = out["tiers"]
    return out | {
        "median_ttft_ms": tiers["median TTFT ms"], "median_limit_ms": tiers["median limit ms"],
        "median_ttft_over_limit": tiers["median TTFT / limit"],
        "tiers_over_gpu_only_ttft": tiers["mean TTFT ms"] / out["gpu_only"]["mean TTFT ms"],
        "rounds_apart": max(row["rounds apart %"] for row in rows) / 100,
    }  # fmt: skip


# -- step time with and without the lower tiers -------------------------------------------------------------


def step_times(model: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    """Step times of the same workload with host + disk tiers and with the GPU tier alone, in alternating
    rounds so drifting machine load falls on both. The noise beside the ratio: how far one configuration's
    two rounds differ from each other."""
    rounds: dict[str, list[list[tuple[float, float]]]] = {"tiers": [], "gpu_only": []}
    for name in ("tiers", "gpu_only", "gpu_only", "tiers"):  # (a steady drift falls on both alike)
        rounds[name].append(_on_fresh_thread(lambda tiers=name == "tiers": _one_run(model, args, tiers)))
    rows = []
    for name, runs in rounds.items():
        steps = [step for run in runs for step in run]
        t = [wall for wall, _ in steps]
        off_cpu = statistics.mean(wall - cpu for wall, cpu in steps)
        round_means = [statistics.mean(wall for wall, _ in run) for run in runs]
        rows.append({"tiers": name, "steps": len(t), "mean step ms": statistics.mean(t),
                     "median step ms": statistics.median(t), "p90 step ms": sorted(t)[len(t) * 9 // 10],
                     "max step ms": max(t), "engine thread off its CPU ms": off_cpu,
                     "round means ms": " / ".join(f"{m:.2f}" for m in round_means),
                     "rounds apart %": _percent_apart(round_means)})  # fmt: skip
    print(f"\nsteps: {args.step_streams} decoding streams, a {args.step_prompt}-token prefill every 4 steps")
    print_table(rows)
    mean = {row["tiers"]: row["mean step ms"] for row in rows}
    return {"rows": rows, "tiers_over_gpu_only_step": mean["tiers"] / mean["gpu_only"],
            "rounds_apart": max(row["rounds apart %"] for row in rows) / 100,
            "step_ms": {name: [[round(wall, 3) for wall, _ in run] for run in runs]
                        for name, runs in rounds.items()}}  # fmt: skip


def _percent_apart(means: list[float]) -> float:
    """How far the largest of a configuration's round means is above the smallest, in percent."""
    return 100 * (max(means) / min(means) - 1)


def _one_run(model: LoadedModel, args: argparse.Namespace, tiers: bool) -> list[tuple[float, float]]:
    """(wall, engine thread CPU) ms of each timed step. On a GPU the thread spins while it waits for the
    device, so the difference is time it could not run: waiting for the interpreter lock, or a driver's.
    (On a CPU, torch's own threads compute part of the step.)"""
    streams, prompt_tokens, steps = args.step_streams, args.step_prompt, args.steps
    # the streams' own KV fits; each arriving prefill evicts earlier ones (demoted when there are tiers)
    pool_tokens = streams * (prompt_tokens + 2 * steps + 64) + 3 * prompt_tokens
    kv_dir = Path(tempfile.mkdtemp(prefix="warmkv-bench-steps-"))
    engine = LLMEngine(model, _engine_config(args, pool_tokens, tiers, kv_dir if tiers else None))
    try:
        new_prompt = lambda: torch.randint(100, 30000, (prompt_tokens,)).tolist()  # noqa: E731
        for _ in range(streams):
            engine.add_request(
                new_prompt(), SamplingParams(engine.max_model_len - prompt_tokens, ignore_eos=True)
            )
        while any(seq.num_uncomputed > 1 for seq in engine.running) or engine.waiting:
            engine.step()  # every stream decoding
        times = []
        for step in range(2 * steps):
            if step % 4 == 0:
                engine.add_request(new_prompt(), SamplingParams(max_tokens=1))
            synchronize(model.device)
            start, cpu = time.perf_counter(), time.thread_time()
            engine.step()
            synchronize(model.device)
            times.append(((time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000))
        return times[steps:]  # the first half fills the pool
    finally:
        engine.close()
        shutil.rmtree(kv_dir, ignore_errors=True)


def _on_fresh_thread(run: Callable[[], Any]) -> Any:
    """Drive an engine from a thread of its own, as the server does. On a CPU, forward passes on a thread
    that had loaded the model and built the engine ran many times slower on this project's machine."""
    with ThreadPoolExecutor(1, thread_name_prefix="bench-ttft-engine") as worker:
        return worker.submit(run).result()


def _engine_config(
    args: argparse.Namespace, pool_tokens: int, tiers: bool, kv_dir: Path | None
) -> EngineConfig:
    # live hits only: nothing to decide between loading and recomputing, so no start-up measurement of it
    cache = CacheConfig(host_tokens=pool_tokens if tiers else 0, disk=kv_dir is not None, kv_dir=kv_dir,
                        load_policy=LoadPolicy.ALWAYS)  # fmt: skip
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, kv_pool_tokens=pool_tokens,
                        max_batch_tokens=args.max_batch_tokens, max_num_seqs=max(8, args.step_streams + 2),
                        cache=cache)  # fmt: skip


if __name__ == "__main__":
    main()
