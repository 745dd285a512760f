"""`warmkv bench replay`: send an agent trace's requests through the HTTP API, policy after policy.

Each policy gets a fresh embedded server on loopback (its own disk directory) over the same loaded model;
a request marked `restart` stops the server (flushing its disk writer) and starts a new one on the same
directory. A peer (`--peer`, or the server given by `--url`) gets the same requests through the same client;
a restart restarts the peer where it can (see warmkv.bench.peers) and is marked skipped where not.
TTFT is the time to the first streamed token of a `max_tokens: 1` request, sent by a client in a process of
its own (see warmkv.bench.client_process).
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

from tqdm import tqdm

from warmkv.bench.client_process import ClientProcess
from warmkv.bench.load import Endpoint, engine_counters
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


Dispatch = Callable[[TraceRequest], Endpoint]  # which server a request goes to


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
    endpoint = Endpoint(peer.url, peer.api_key)

    def restart() -> tuple[Dispatch, Restart]:
        if not peer.can_restart:
            return lambda _: endpoint, Restart.SKIPPED
        peer.restart()
        return lambda _: endpoint, Restart.DONE

    return _replay(lambda _: endpoint, restart, peer.model, requests, max_gap_s, peer.name)


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
        endpoints = [Endpoint(f"{r.url}/v1") for r in running]
        if cluster.routed:
            running.append(serve_in_thread(create_router_app(Router([r.url for r in running]))))
            router = Endpoint(f"{running[-1].url}/v1")
            return lambda _: router
        turns = itertools.count()
        return lambda _: endpoints[next(turns) % len(endpoints)]

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
    results, started = [], time.perf_counter()
    with ClientProcess() as client:
        for index, request in enumerate(tqdm(requests, desc=f"replay {label}", unit="req", leave=False)):
            restarted = Restart.NONE
            if request.restart and index:
                dispatch, restarted = restart()
            time.sleep(min(request.gap_s, max_gap_s))
            # one token: the time to it is the measure (ignore_eos, which hosted APIs refuse, changes nothing)
            sent = client.send(dispatch(request), model, request, index, 1, started, ignore_eos=False)
            turn = TurnResult(index, request.session, request.shape, sent.prompt_tokens, sent.cached_tokens,
                              sent.ttft_s if sent.ttft_s is not None else sent.latency_s, sent.latency_s,
                              restart=restarted)  # fmt: skip
            if sent.error is not None or sent.status != "200":
                # one request's failure is its row's error, not the run's
                turn.error = f"{sent.status}: {sent.error}"[:300]
                log.warning("replay %s request %d failed: %s", label, index, turn.error)
            results.append(turn)
    return results
