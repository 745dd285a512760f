"""`warmkv bench load`: agent sessions replayed concurrently against one server, as many users would run.

Every session runs on a thread of its own (all at once, or a given number at a time): its requests in
order, each after a tool time drawn from an exponential distribution, each streaming a reply of a fixed
number of tokens. `copies` multiplies the
sessions into distinct conversations that share the system prompt and tools (the first user message gets
a copy mark), so the same trace can put any number of sessions at once on the server.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx
from tqdm import tqdm

from warmkv.bench.peer_tokens import cached_tokens
from warmkv.bench.trace import TraceRequest

if TYPE_CHECKING:
    from warmkv.engine.llm_engine import LLMEngine

SCHEDULER_METRICS = ("preemptions", "swapped_out_bytes", "swapped_in_bytes", "recomputed_tokens")
TIER_METRICS = ("writes", "evictions", "skipped_writes")


@dataclass(slots=True, frozen=True)
class LoadShape:
    tool_time_s: float = 2.0  # mean of the exponential idle time before each request of a session
    reply_tokens: int = 32  # every request generates exactly this many tokens (ignore_eos)
    seed: int = 0
    concurrency: int = 0  # sessions running at once, each one's end starting the next; 0: all of them


@dataclass(slots=True, frozen=True)
class Endpoint:
    """An OpenAI-compatible server the load goes to."""

    base_url: str  # ending in /v1
    api_key: str = "unused"


@dataclass(slots=True)
class LoadRun:
    results: list[RequestResult]  # in trace order
    wall_s: float
    process_cpu_s: (
        float  # this process's CPU time during the run: the client's, and the server's when embedded
    )


@dataclass(slots=True)
class RequestResult:
    session: str
    turn: int
    status: str  # "200", another HTTP status, "stream_error", "connection", "no_usage" or "bad_stream"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    started_s: float = 0.0  # since the run began
    error: str | None = None  # the server's message, for a failed request


def multiply_sessions(requests: list[TraceRequest], copies: int) -> list[TraceRequest]:
    """The trace `copies` times over; copy k > 0 marks the first non-system message of each session, so
    it is a distinct conversation after the shared system prompt and tools."""
    out = list(requests)
    for k in range(1, copies):
        for request in requests:
            messages = [dict(m) for m in request.messages]
            first = next((m for m in messages if m["role"] != "system"), None)
            if first is not None and isinstance(first.get("content"), str):
                first["content"] = f"[conversation {k}] {first['content']}"
            out.append(replace(request, session=f"{request.session}~{k}", messages=messages))
    return out


def by_session(requests: list[TraceRequest]) -> dict[str, list[TraceRequest]]:
    sessions: dict[str, list[TraceRequest]] = {}
    for request in requests:
        sessions.setdefault(request.session, []).append(request)
    return sessions


def run_load(endpoints: list[Endpoint], model: str, requests: list[TraceRequest], shape: LoadShape,
             progress: Callable[[], None] = lambda: None,
             transport: httpx.BaseTransport | None = None) -> LoadRun:  # fmt: skip
    """Replay the sessions, all at once or `shape.concurrency` at a time (as many users, each starting the
    next conversation when theirs ends). Requests go to the endpoints in turn (round-robin over several
    servers); one endpoint, one server."""
    sessions = by_session(requests)
    turns_sent = itertools.count()
    http = httpx.Client(timeout=httpx.Timeout(3600, connect=10), limits=httpx.Limits(max_connections=None),
                        transport=transport)  # fmt: skip
    cpu, started = time.process_time(), time.perf_counter()
    seeds = random.Random(shape.seed)
    rngs = {name: random.Random(seeds.random()) for name in sessions}
    lock = threading.Lock()

    def run_session(name: str) -> list[RequestResult]:
        results = []
        for turn, request in enumerate(sessions[name]):
            time.sleep(rngs[name].expovariate(1 / shape.tool_time_s) if shape.tool_time_s > 0 else 0)
            endpoint = endpoints[next(turns_sent) % len(endpoints)]
            results.append(send_chat(http, endpoint, model, request, turn, shape.reply_tokens, started))
            with lock:
                progress()
        return results

    with http, ThreadPoolExecutor(max_workers=min(shape.concurrency or len(sessions), len(sessions))) as pool:
        per_session = dict(zip(sessions, pool.map(run_session, sessions), strict=True))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    turns = Counter[str]()
    ordered = []
    for request in requests:  # back in trace order, to pair with the oracle
        ordered.append(per_session[request.session][turns[request.session]])
        turns[request.session] += 1
    return LoadRun(ordered, wall, cpu)


def send_chat(http: httpx.Client, endpoint: Endpoint, model: str, request: TraceRequest, turn: int,
              reply_tokens: int, run_started: float, ignore_eos: bool = True) -> RequestResult:  # fmt: skip
    """One streamed chat completion. Plain HTTP and JSON rather than the OpenAI SDK: the SDK's request
    transform and typed chunks cost about 10 ms of this process's CPU per tau-bench request (on this
    project's CPU), which a hundred sessions in one process would turn into client-side queueing, and
    about 6 ms of a 32k-token hit's TTFT on the H100's host (a one-off timestamp trace), which is the
    client's time, not the server's."""
    result = RequestResult(request.session, turn, "200", started_s=time.perf_counter() - run_started)
    body = {"model": model, "messages": request.messages, "max_tokens": reply_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            **({"ignore_eos": True} if ignore_eos else {}),
            **({"tools": request.tools} if request.tools else {})}  # fmt: skip
    headers = {"Authorization": f"Bearer {endpoint.api_key}", "Content-Type": "application/json"}
    content = json.dumps(body).encode()  # the client's own work: before the clock starts
    began = time.perf_counter()
    try:
        url = f"{endpoint.base_url.rstrip('/')}/chat/completions"
        with http.stream("POST", url, content=content, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                result.status, result.error = str(response.status_code), _error_message(response.text)
            else:
                _read_stream(response.iter_lines(), result, began)
    except httpx.HTTPError as err:
        result.status, result.error = "connection", f"{type(err).__name__}: {err}"
    except (ValueError, TypeError, AttributeError, KeyError) as err:  # events not a chat completion's
        result.status, result.error = "bad_stream", f"{type(err).__name__}: {err}"[:300]
    result.latency_s = time.perf_counter() - began
    return result


def _read_stream(lines: Iterator[str], result: RequestResult, began: float) -> None:
    """Server-sent events of a chat completion into the result: TTFT at the first output, the usage."""
    usage, extra = None, {}
    for line in lines:
        data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
        if not data or data == "[DONE]":
            continue
        event = json.loads(data)
        if event.get("error"):  # an error event inside a stream that had started
            result.status, result.error = "stream_error", _error_message(data)
            return
        choices = event.get("choices") or []
        if result.ttft_s is None and choices and _has_output(choices[0]):
            result.ttft_s = time.perf_counter() - began
        usage = event.get("usage") or usage
        extra = (
            event if "timings" in event else extra
        )  # llama-server sends its timings (cache_n) beside usage
    if usage is None:
        result.status, result.error = "no_usage", "no usage in the stream (stream_options.include_usage)"
        return
    result.prompt_tokens = usage["prompt_tokens"]
    result.cached_tokens = cached_tokens(usage, extra)
    result.completion_tokens = usage.get("completion_tokens", 0)  # a peer may leave it out


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body, else the body."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:300]
    return str(error.get("message", error)) if isinstance(error, dict) else str(error or text)[:300]


def measure_load(endpoints: list[Endpoint], model: str, requests: list[TraceRequest], oracle: list[int],
                 shape: LoadShape, label: str) -> dict[str, Any]:  # fmt: skip
    """One row: the sessions run against the endpoints (as `shape` says), with a progress bar, summarised."""
    with tqdm(total=len(requests), desc=f"load {label}", unit="req", leave=False) as bar:
        run = run_load(endpoints, model, requests, shape, bar.update)
    return summarize_load(run, oracle)


def warm_up_turns(requests: list[TraceRequest]) -> list[TraceRequest]:
    """The trace's sessions (one copy of each) once more, to run on a throwaway server, without tool time,
    before anything is measured: the Triton kernels compile for the shapes the load takes (seconds each),
    which would otherwise be paid by whichever policy runs first. (With only each session's first two
    turns, the policy measured first still paid: with ample memory warmkv measured 13% slower mean TTFT
    than the GPU tier alone when it ran first, 15% faster when it ran second.) Their first message is
    marked, so the kernels see the lengths of the load, not its text, and the measured rows find none of
    it cached."""
    turns = []
    for name, session in by_session(requests).items():
        for request in session:
            messages = [dict(m) for m in request.messages]
            if messages and isinstance(messages[0].get("content"), str):
                messages[0]["content"] = f"[warm-up] {messages[0]['content']}"
                turns.append(replace(request, session=f"warm-up {name}", messages=messages))
    return turns


def no_wait(shape: LoadShape) -> LoadShape:
    """The warm-up's shape: every session at once, no tool time."""
    return replace(shape, tool_time_s=0.0, concurrency=0)


def engine_counters(engine: LLMEngine) -> dict[str, Any]:
    """The scheduler's preemptions and swaps since the engine started, and per tier the blocks written
    and evicted: whether, and where, the tiers moved blocks during a run."""
    counters: dict[str, Any] = {name: getattr(engine.stats, name) for name in SCHEDULER_METRICS}
    if engine.prefix_cache is not None:
        counters["tiers"] = {tier.value: {name: getattr(stats, name) for name in TIER_METRICS}
                             for tier, stats in engine.prefix_cache.stats().items()}  # fmt: skip
    return counters


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"))


def summarize_load(run: LoadRun, oracle: list[int]) -> dict[str, Any]:
    results, wall_s = run.results, run.wall_s
    ok = [r for r in results if r.status == "200"]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    latencies = sorted(r.latency_s for r in ok)
    errors = Counter(r.status for r in results if r.status != "200")
    return {
        "requests": len(results),
        "errors": sum(errors.values()),
        "errors_by_status": dict(errors),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "oracle_tokens": sum(o for r, o in zip(results, oracle, strict=True) if r.status == "200"),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        **{f"ttft_{name}_s": value for name, value in _percentiles(ttfts).items()},
        **{f"latency_{name}_s": value for name, value in _percentiles(latencies).items()},
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "generated_tokens_per_s": sum(r.completion_tokens for r in ok) / wall_s if wall_s else 0.0,
        # the benchmark process's CPU per request: the client's alone where the server runs elsewhere
        # (--url, --peer, --replicas); with an embedded server, its share too
        "bench_process_cpu_ms_per_request": 1000 * run.process_cpu_s / len(results) if results else 0.0,
        "requests_detail": [_detail(r) for r in results],
    }


def _detail(r: RequestResult) -> dict[str, Any]:
    return {"session": r.session, "turn": r.turn, "status": r.status, "started_s": round(r.started_s, 4),
            "ttft_s": r.ttft_s, "latency_s": round(r.latency_s, 4), "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens, **({"error": r.error[:300]} if r.error else {})}  # fmt: skip


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    pick = lambda q: values[min(len(values) - 1, int(len(values) * q))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}
