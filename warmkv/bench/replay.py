"""`warmkv bench replay`: send an agent trace's requests through the HTTP API, policy after policy.

Each policy gets a fresh embedded server on loopback (its own disk directory) over the same loaded model;
a request marked `restart` stops the server (flushing its disk writer) and starts a new one on the same
directory. A peer (`--peer`, or the server given by `--url`) gets the same requests through the same client;
a restart restarts the peer where it can (see warmkv.bench.peers) and is marked skipped where not.
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
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openai import OpenAI, OpenAIError
from tqdm import tqdm

from warmkv.bench.load import engine_counters
from warmkv.bench.peer_tokens import cached_tokens
from warmkv.bench.peers import Peer
from warmkv.bench.trace import TraceRequest
from warmkv.models.loader import LoadedModel

if TYPE_CHECKING:
    from warmkv.server.embedded import EmbeddedServer

log = logging.getLogger("warmkv.bench")


class Restart(str, Enum):
    """What became of a trace's restart before a turn."""

    NONE = ""
    DONE = "done"  # the server was stopped and started; it kept whatever its cache keeps over a restart
    SKIPPED = "skipped"  # the server cannot be restarted from here (--url): the turn ran on a warm server


@dataclass(slots=True)
class TurnResult:
    index: int
    session: str
    shape: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    latency_s: float = 0.0  # the whole request, to its last byte
    error: str = ""  # why the request failed; its tokens then count nowhere
    restart: Restart = Restart.NONE


def send(client: OpenAI, model: str, request: TraceRequest) -> tuple[int, int, float, float]:
    """(prompt tokens, cached tokens, TTFT, latency) of one streamed request."""
    options = {"tools": request.tools} if request.tools else {}
    started = time.perf_counter()
    ttft = None
    usage, extra = None, {}
    stream = client.chat.completions.create(
        model=model, messages=request.messages, max_tokens=1, temperature=0, stream=True,
        stream_options={"include_usage": True}, **options,
    )  # fmt: skip
    for chunk in stream:
        first = chunk.choices[0] if chunk.choices else None
        if ttft is None and first is not None and (first.delta.content or first.finish_reason):
            ttft = time.perf_counter() - started
        usage = chunk.usage or usage
        extra = chunk.model_extra or extra  # llama-server sends its timings (cache_n) beside usage
    latency = time.perf_counter() - started
    if usage is None:
        raise RuntimeError("the server sent no usage: it must support stream_options.include_usage")
    cached = cached_tokens(usage.model_dump(), extra)
    return usage.prompt_tokens, cached, ttft if ttft is not None else latency, latency


Dispatch = Callable[[TraceRequest], OpenAI]  # which server a request goes to


def free_gpu_for_peer() -> None:
    """A peer shares the GPU with warmkv's loaded model: the pools of warmkv's stopped servers, freed but
    still held by torch's caching allocator, go back to the device before the peer sizes its KV."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def replay_on_peer(peer: Peer, requests: list[TraceRequest], max_gap_s: float) -> list[TurnResult]:
    """The trace against a peer server (running, or started and stopped by the caller), through the same
    client code as warmkv's rows; restarts as the peer can make them."""
    client = OpenAI(base_url=peer.url, api_key=peer.api_key, max_retries=0, timeout=600)

    def restart() -> tuple[Dispatch, Restart]:
        if not peer.can_restart:
            return lambda _: client, Restart.SKIPPED
        peer.restart()
        return lambda _: client, Restart.DONE

    return _replay(lambda _: client, restart, peer.model, requests, max_gap_s, peer.name)


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


def stop_embedded(server: EmbeddedServer) -> dict[str, Any]:
    """Stop a server of embedded_warmkv (its disk writer flushed); its engine's scheduler and tier counters.
    The app's reference cycles hold the engine (pinned host tier, GPU pool): collected here, so that the
    next server finds the memory free."""
    counters = engine_counters(server.engine.engine)
    server.stop()
    gc.collect()
    return counters


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

    def restart() -> tuple[Dispatch, Restart]:
        stop()
        return start(), Restart.DONE

    try:
        return _replay(start(), restart, model.name, requests, max_gap_s, label)
    finally:
        stop()
        shutil.rmtree(kv_dir, ignore_errors=True)  # a long replay writes gigabytes of KV


def _replay(dispatch: Dispatch, restart: Callable[[], tuple[Dispatch, Restart]], model: str,
            requests: list[TraceRequest], max_gap_s: float, label: str) -> list[TurnResult]:  # fmt: skip
    results = []
    for index, request in enumerate(tqdm(requests, desc=f"replay {label}", unit="req", leave=False)):
        restarted = Restart.NONE
        if request.restart and index:
            dispatch, restarted = restart()
        time.sleep(min(request.gap_s, max_gap_s))
        turn = TurnResult(index, request.session, request.shape, 0, 0, 0.0, restart=restarted)
        try:
            turn.prompt_tokens, turn.cached_tokens, turn.ttft_s, turn.latency_s = send(
                dispatch(request), model, request
            )
        except (OpenAIError, RuntimeError) as err:  # one request's failure is its row's error, not the run's
            turn.error = f"{type(err).__name__}: {err}"[:300]
            log.warning("replay %s request %d failed: %s", label, index, turn.error)
        results.append(turn)
    return results
