"""A real warmkv server on a loopback port, run in a background thread of the test process."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import uvicorn
from openai import OpenAI

from warmkv.cache.config import CacheConfig
from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.models.loader import LoadedModel, load_model
from warmkv.server.app import ServerSettings, create_app


@dataclass
class RunningServer:
    url: str
    engine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, api_key: str = "unused", **options: object) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: LoadedModel, config: EngineConfig | None = None, max_pending: int = 256, **settings: object
) -> RunningServer:
    # each server its own disk tier, so no test sees another's stored KV
    default = EngineConfig(
        kv_pool_tokens=16384, cache=CacheConfig(kv_dir=Path(tempfile.mkdtemp(prefix="kv-")))
    )
    engine = AsyncEngine(LLMEngine(model, config or default), max_pending)
    app = create_app(engine, ServerSettings(**settings))  # type: ignore[arg-type]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return RunningServer(f"http://127.0.0.1:{port}", engine, server, thread)


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load_model(None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def server(default_model: LoadedModel) -> Iterator[RunningServer]:
    running = start_server(default_model)
    yield running
    running.stop()
