"""`warmkv bench replay`: send an agent trace's requests through the HTTP API, policy after policy.

Each policy gets a fresh embedded server on loopback (its own disk directory) over the same loaded model;
a request marked `restart` stops the server (flushing its disk writer) and starts a new one on the same
directory. With `--url`, the requests go to that server instead (one row, restarts not possible).
TTFT is the time to the first streamed token of a `max_tokens: 1` request.
"""

from __future__ import annotations

import gc
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from openai import OpenAI
from tqdm import tqdm

from warmkv.bench.trace import TraceRequest
from warmkv.models.loader import LoadedModel

if TYPE_CHECKING:
    from warmkv.server.embedded import EmbeddedServer

log = logging.getLogger("warmkv.bench")


@dataclass(slots=True)
class TurnResult:
    index: int
    session: str
    shape: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


def send(client: OpenAI, model: str, request: TraceRequest) -> tuple[int, int, float]:
    """(prompt tokens, cached tokens, TTFT) of one streamed request."""
    options = {"tools": request.tools} if request.tools else {}
    started = time.perf_counter()
    ttft = None
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=request.messages, max_tokens=1, temperature=0, stream=True,
        stream_options={"include_usage": True}, **options,
    )  # fmt: skip
    for chunk in stream:
        first = chunk.choices[0] if chunk.choices else None
        if ttft is None and first is not None and (first.delta.content or first.finish_reason):
            ttft = time.perf_counter() - started
        usage = chunk.usage or usage
    if usage is None:
        raise RuntimeError("the server sent no usage: it must support stream_options.include_usage")
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens if details else None) or (usage.model_extra or {}).get(
        "prompt_cache_hit_tokens", 0
    )
    return usage.prompt_tokens, cached or 0, ttft if ttft is not None else time.perf_counter() - started


Dispatch = Callable[[TraceRequest], OpenAI]  # which server a request goes to


def replay_on_url(url: str, api_key: str, model: str, requests: list[TraceRequest],
                  max_gap_s: float) -> list[TurnResult]:  # fmt: skip
    client = OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
    if any(r.restart for r in requests):
        log.warning("the trace restarts the server; against --url the restarts are skipped")
    return _replay(lambda: lambda _: client, lambda: None, model, requests, max_gap_s, "url")


@dataclass(slots=True, frozen=True)
class Cluster:
    replicas: int = 1
    routed: bool = False  # through `warmkv router`; else requests go round-robin over the replicas
    redis_url: str | None = None  # the shared tier, for every replica


def embedded_warmkv(model: LoadedModel, flags: list[str], kv_dir: Path) -> EmbeddedServer:
    """A warmkv server on loopback over an already loaded model, configured by `warmkv serve` flags."""
    from warmkv.config_flags import serve_configs
    from warmkv.engine.llm_engine import LLMEngine
    from warmkv.server.embedded import start_embedded_server

    config, settings = serve_configs(["--kv-dir", str(kv_dir), *flags])
    return start_embedded_server(LLMEngine(model, config), settings)


def replay_embedded(model: LoadedModel, flags: list[str], requests: list[TraceRequest], max_gap_s: float,
                    label: str, cluster: Cluster = Cluster()) -> list[TurnResult]:  # fmt: skip
    from warmkv.router.affinity import Router
    from warmkv.router.app import create_router_app
    from warmkv.server.embedded import ThreadedServer, serve_in_thread

    kv_dir = Path(tempfile.mkdtemp(prefix=f"warmkv-replay-{label}-"))
    shared = ["--redis-url", cluster.redis_url] if cluster.redis_url else []
    running: list[ThreadedServer] = []

    def start() -> Dispatch:
        for n in range(cluster.replicas):  # each replica its own disk tier
            running.append(embedded_warmkv(model, [*flags, *shared], kv_dir / f"replica-{n}"))
        clients = [r.client(timeout=600) for r in running]
        if cluster.routed:
            running.append(serve_in_thread(create_router_app(Router([r.url for r in running]))))
            router = running[-1].client(timeout=600)
            return lambda _: router
        turns = itertools.count()
        return lambda _: clients[next(turns) % len(clients)]

    def stop() -> None:
        while running:
            running.pop().stop()  # the router first, then the replicas
        gc.collect()  # the apps' reference cycles hold engines: pinned host tiers, GPU pools

    try:
        return _replay(start, stop, model.name, requests, max_gap_s, label)
    finally:
        stop()
        shutil.rmtree(kv_dir, ignore_errors=True)  # a long replay writes gigabytes of KV


def _replay(start: Callable[[], Dispatch], stop: Callable[[], None], model: str, requests: list[TraceRequest],
            max_gap_s: float, label: str) -> list[TurnResult]:  # fmt: skip
    dispatch = start()
    results = []
    for index, request in enumerate(tqdm(requests, desc=f"replay {label}", unit="req", leave=False)):
        if request.restart and index:
            stop()
            dispatch = start()
        time.sleep(min(request.gap_s, max_gap_s))
        prompt, cached, ttft = send(dispatch(request), model, request)
        results.append(TurnResult(index, request.session, request.shape, prompt, cached, ttft))
    return results
