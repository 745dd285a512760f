"""A real warmkv server on a loopback port, run in a background thread of the test process."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from warmkv.cache.config import CacheConfig
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.models.loader import LoadedModel, load_model
from warmkv.server.app import ServerSettings
from warmkv.server.embedded import EmbeddedServer, start_embedded_server

KV_ROOT: dict[str, Path] = {}  # "root": where the servers' disk tiers go, in pytest's own temporary folder


@pytest.fixture(scope="session", autouse=True)
def _kv_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """pytest removes its temporary folders of older runs (the servers' KV was left in /tmp, 290 MB a run)."""
    KV_ROOT["root"] = tmp_path_factory.mktemp("server-kv")


def start_server(
    model: LoadedModel, config: EngineConfig | None = None, max_pending: int = 256, **settings: object
) -> EmbeddedServer:
    # each server its own disk tier, so no test sees another's stored KV
    kv_dir = Path(tempfile.mkdtemp(prefix="kv-", dir=KV_ROOT["root"]))
    default = EngineConfig(kv_pool_tokens=16384, cache=CacheConfig(kv_dir=kv_dir))
    engine = LLMEngine(model, config or default)
    return start_embedded_server(engine, ServerSettings(**settings), max_pending)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load_model(None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def server(default_model: LoadedModel) -> Iterator[EmbeddedServer]:
    running = start_server(default_model)
    yield running
    running.stop()
