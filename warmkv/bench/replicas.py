"""Replicas of one model, a process per device, and the router in front of them: `warmkv bench load
--replicas N`.

Each replica process loads the model once, on its own GPU (CUDA_VISIBLE_DEVICES names one device before
CUDA initialises, so everything the process launches, Triton kernels and CUDA graphs included, lands there),
then serves a fresh embedded warmkv server per measured row, as the single-process rows do over their
one model. A process each keeps one replica's Python (scheduler, HTTP, tokeniser) from waiting on
another's, as separate servers would. The router is the `warmkv router` command, in a process of its own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import redis

from warmkv.bench.load import SCHEDULER_METRICS, Endpoint, LoadShape, measure_load, no_wait
from warmkv.bench.policies import Capacities, cluster_variants, policies
from warmkv.bench.processes import terminate, wait_ready
from warmkv.bench.redis_process import RedisProcess
from warmkv.bench.trace import TraceRequest
from warmkv.errors import WarmkvError
from warmkv.server.embedded import free_port

log = logging.getLogger("warmkv.bench")


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """What each replica loads: the bench's --model, or --shape over --tokenizer (seeded random weights,
    the same in every replica, so they share cached KV)."""

    model: str | None
    shape: str | None
    tokenizer: str | None
    dtype: str


@dataclass(slots=True, frozen=True)
class ReplicaIdentity:
    """What a replica reports once its model is loaded."""

    model_name: str
    tokenizer_folder: str
    gpu_name: str  # "cpu" on the CPU


class Command(str, Enum):
    START = "start"  # a fresh server: (flags, kv_dir) -> its URL
    STOP = "stop"  # stop the server -> its counters
    EXIT = "exit"


class Reply(str, Enum):
    OK = "ok"
    ERROR = "error"


class ReplicaProcess:
    """One replica: a process holding the model on `gpu` (an index among this process's visible GPUs;
    None: the CPU)."""

    def __init__(self, spec: ModelSpec, gpu: int | None) -> None:
        """Starts loading; `wait_loaded` waits for it (replicas load side by side)."""
        context = multiprocessing.get_context("spawn")  # a fork would copy the parent's threads and CUDA
        self.device = "cpu" if gpu is None else f"GPU {gpu}"
        self._gpu = gpu
        self._conn, child = context.Pipe()
        mask = None if gpu is None else _physical_gpu(gpu)
        self._process = context.Process(
            target=_replica_main,
            args=(child, spec, mask),
            name=f"warmkv replica ({self.device})",
            daemon=True,
        )
        self._process.start()
        child.close()

    def wait_loaded(self, timeout_s: float = 1800) -> ReplicaIdentity:
        return self.answer(timeout_s)

    def start(self, flags: list[str], kv_dir: Path) -> None:
        """A fresh warmkv server over the loaded model, configured by `warmkv serve` flags; `answer` gives
        its URL (replicas start side by side)."""
        device = "cpu" if self._gpu is None else "cuda"  # the one device the process sees
        self._send(Command.START, [*flags, "--device", device], str(kv_dir))

    def stop(self) -> None:
        """Stop the server (its disk writer flushed); `answer` gives its scheduler and tier counters."""
        self._send(Command.STOP)

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # it is going already
                self._conn.send((Command.EXIT,))
            self._process.join(timeout=120)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def answer(self, timeout_s: float = 600) -> Any:
        """The reply to the last command; the replica's error, or its exit, raised here."""
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(1.0):
            if time.monotonic() > deadline:
                raise WarmkvError(f"the replica on {self.device} did not answer in {timeout_s:.0f} s")
        try:  # a replica that exited reads as the end of the pipe
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._exited() from None
        if status is Reply.ERROR:
            raise WarmkvError(f"the replica on {self.device}: {value}")
        return value

    def _send(self, command: Command, *payload: object) -> None:
        try:
            self._conn.send((command, *payload))
        except OSError:
            raise self._exited() from None

    def _exited(self) -> WarmkvError:
        self._process.join(timeout=10)
        return WarmkvError(f"the replica on {self.device} exited (code {self._process.exitcode})")


def _physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's visible GPU `index` (its own mask, if it has one)."""
    mask = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return mask[index] if index < len(mask) else str(index)


def replica_gpus(device: str, replicas: int) -> list[int | None]:
    """Replica i on GPU i; on the CPU (--device cpu, or no GPU) all of them. Fewer GPUs than replicas
    is an error: two replicas on one GPU would measure contention, not scaling."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return [None] * replicas
    if device not in ("auto", "cuda"):
        raise WarmkvError(
            f"--replicas places replica i on cuda:i: pass --device cuda, auto or cpu, not {device}"
        )
    count = torch.cuda.device_count()
    if count < replicas:
        raise WarmkvError(f"--replicas {replicas} needs {replicas} GPUs; this machine has {count}")
    return list(range(replicas))


def _replica_main(conn: Connection, spec: ModelSpec, gpu_mask: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us in turn
    if gpu_mask is not None:  # before CUDA initialises: everything this process launches lands there
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_mask
    from warmkv.bench.replay import embedded_warmkv, stop_embedded
    from warmkv.engine.config import EngineConfig
    from warmkv.models.random_init import model_or_shape

    try:
        config = EngineConfig(device="cpu" if gpu_mask is None else "cuda", dtype=spec.dtype)
        device = config.torch_device()
        model = model_or_shape(spec.model, spec.shape, spec.tokenizer, device, config.torch_dtype(device))
        import torch

        gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        conn.send((Reply.OK, ReplicaIdentity(model.name, str(model.folder), gpu_name)))
    except Exception as err:  # the parent reports it
        conn.send((Reply.ERROR, _failure(err)))
        return
    server = None
    while True:
        command, *payload = conn.recv()
        if command is Command.EXIT:
            if server is not None:
                server.stop()
            return
        try:
            if command is Command.START and server is None:
                server = embedded_warmkv(model, payload[0], Path(payload[1]))
                conn.send((Reply.OK, server.url))
            elif command is Command.STOP and server is not None:
                counters, server = stop_embedded(server), None
                conn.send((Reply.OK, counters))
            else:
                conn.send((Reply.ERROR, f"{command.value} with {'a' if server else 'no'} server running"))
        except Exception as err:  # the parent reports it
            conn.send((Reply.ERROR, _failure(err)))


def _failure(err: Exception) -> str:
    """What the parent says of a replica's error: the error, and where in the replica it was raised."""
    where = traceback.extract_tb(err.__traceback__)[-8:]
    return f"{type(err).__name__}: {err} (at {'; '.join(f'{f.filename}:{f.lineno} {f.name}' for f in where)})"


class RouterProcess:
    """`warmkv router` over the replicas' URLs, on a loopback port."""

    def __init__(self, urls: list[str]) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        replicas = [arg for url in urls for arg in ("--replica", url)]
        command = [
            sys.executable,
            "-m",
            "warmkv",
            "router",
            *replicas,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        # a session of its own: Ctrl-C is the benchmark's to handle, which stops the router in turn
        self._process = subprocess.Popen(command, start_new_session=True)
        try:
            wait_ready(self._process, self._answers, "`warmkv router`", timeout_s=60, poll_s=0.2)
        except WarmkvError:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def served(self) -> list[int]:
        """Requests each replica got, in the order of the URLs."""
        return [r["served"] for r in httpx.get(f"{self.url}/health", timeout=10).json()["replicas"]]

    def stop(self) -> None:
        terminate(self._process)


ONE_REPLICA = "1x_all_memory"  # the row of one replica with the memory of all of them


def row_names(replicas: int) -> list[str]:
    """The rows of `bench load --replicas N`, in their default order."""
    return [ONE_REPLICA, *(variant.name for variant in cluster_variants(replicas))]


@dataclass(slots=True)
class Cluster:
    """The rows of a replicated load run: one replica holding all the memory, then the N replicas each
    holding 1/N of it, round-robin and routed, each with and without the shared tier."""

    replicas: list[ReplicaProcess]
    gpu_names: list[str]  # what each replica reported: "cpu" on the CPU
    model_name: str
    flags: list[str]  # every server's, beside the warmkv policy's and the pool's
    redis_url: str | None  # the shared tier; None: a local redis-server for the run

    def describe(self, each: Capacities) -> dict[str, Any]:
        return {
            "count": len(self.replicas),
            "devices": [f"{r.device}: {name}" for r, name in zip(self.replicas, self.gpu_names, strict=True)],
            "per_replica_capacities": asdict(each),
            "shared_tier": self.redis_url or "a local redis-server",
            "shared_tier_emptied": "before each shared row",
        }

    def rows(self, names: list[str], requests: list[TraceRequest], oracle: list[int], shape: LoadShape,
             each: Capacities,
             warm_up: list[TraceRequest]) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
        """The rows named (see row_names), in that order: each replica with `each`, or one replica with
        all of theirs. On GPUs the warm-up turns run first, round-robin, so that every replica compiles
        its kernels (see warm_up_turns)."""
        n, flags = len(self.replicas), self._flags(each)
        variants = {variant.name: variant for variant in cluster_variants(n)}
        shared = any(variants[name].shared for name in names if name in variants)
        store = RedisProcess() if shared and not self.redis_url else None
        shared_url = self.redis_url or (store.url if store else None)
        try:
            if self.gpu_names[0] != "cpu":
                self._row(self.replicas, flags, warm_up, [0] * len(warm_up), no_wait(shape), "warm-up")
            for name in names:
                if name == ONE_REPLICA:
                    row = self._row(
                        self.replicas[:1], self._flags(each.times(n)), requests, oracle, shape, name
                    )
                    yield name, {"description": f"warmkv on one replica with all {n} replicas' memory"} | row
                    continue
                variant = variants[name]
                if variant.shared:  # every row starts from an empty shared tier
                    redis.Redis.from_url(shared_url).flushdb()  # type: ignore[arg-type]
                row = self._row(self.replicas, flags, requests, oracle, shape, name, routed=variant.routed,
                                shared=shared_url if variant.shared else None)  # fmt: skip
                yield name, {"description": variant.description} | row
        finally:
            if store is not None:
                store.stop()

    def scaling(self, rows: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Each row's cached tokens over the oracle's, and each replicated row's throughput over one
        replica's (the issue's goals: router + shared tier within 5% of one replica's cached/oracle,
        throughput >= 1.8x on two GPUs)."""
        one = rows[ONE_REPLICA]["requests_per_s"] if ONE_REPLICA in rows else 0.0
        ratios = {f"cached_of_oracle_{name}": row["cached_tokens"] / max(1, row["oracle_tokens"])
                  for name, row in rows.items()}  # fmt: skip
        for name, row in rows.items():
            if name != ONE_REPLICA and one:
                ratios[f"throughput_{name}_over_1x"] = row["requests_per_s"] / one
        return ratios

    def _flags(self, caps: Capacities) -> list[str]:
        return [*policies(caps)["warmkv"].flags, "--kv-pool-tokens", str(caps.pool_tokens), *self.flags]

    def _row(self, replicas: list[ReplicaProcess], flags: list[str], requests: list[TraceRequest],
             oracle: list[int], shape: LoadShape, label: str, routed: bool = False,
             shared: str | None = None) -> dict[str, Any]:  # fmt: skip
        kv_root = Path(tempfile.mkdtemp(prefix=f"warmkv-load-{label}-"))
        flags = [*flags, *(["--redis-url", shared] if shared else [])]
        unread = list(replicas)  # sent a start, its reply not read yet
        running: list[ReplicaProcess] = []
        router = None
        try:
            for index, replica in enumerate(replicas):  # each replica its own disk tier
                replica.start(flags, kv_root / f"replica-{index}")
            urls = []
            while unread:
                urls.append(unread[0].answer())  # its reply read, a URL or an error
                running.append(unread.pop(0))
            router = RouterProcess(urls) if routed else None
            endpoints = [Endpoint(f"{url}/v1") for url in ([router.url] if router else urls)]
            row = {"flags": flags} | measure_load(endpoints, self.model_name, requests, oracle, shape, label)
            if router is not None:
                row["served_per_replica"] = router.served()
        except BaseException:
            _stop_servers(unread, running, router, quiet=True)
            raise
        else:
            counters = _stop_servers(unread, running, router, quiet=False)
        finally:
            shutil.rmtree(kv_root, ignore_errors=True)
        return row | _summed(counters) | {"per_replica": counters}


def _stop_servers(unread: list[ReplicaProcess], running: list[ReplicaProcess], router: RouterProcess | None,
                  quiet: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Stop a row's router and servers, those whose start reply an earlier error left unread too; their
    counters. `quiet`: another error is on its way, so a failing stop is logged, not raised."""
    if router is not None:
        router.stop()
    counters = []
    try:
        for replica in unread:
            try:
                replica.answer()
                running.append(replica)
            except WarmkvError:  # it had no server to stop
                pass
        for replica in running:
            replica.stop()
        counters = [replica.answer() for replica in running]
    except WarmkvError as err:
        if not quiet:
            raise
        log.warning("stopping the replicas after a failed row: %s", err)
    return counters


def _summed(counters: list[dict[str, Any]]) -> dict[str, Any]:
    """The replicas' scheduler counters added up, and per tier their blocks written and evicted."""
    total: dict[str, Any] = {name: sum(c[name] for c in counters) for name in SCHEDULER_METRICS}
    tiers: dict[str, dict[str, int]] = {}
    for replica in counters:
        for tier, stats in replica.get("tiers", {}).items():
            for name, value in stats.items():
                tiers.setdefault(tier, {}).setdefault(name, 0)
                tiers[tier][name] += value
    return total | ({"tiers": tiers} if tiers else {})
