"""What a careful operator expects: the key guards metrics and docs, comes from the environment or a file,
any-case `Bearer` works; prompt text stays out of INFO logs; a disconnect is not an error; a read-only
kv-dir costs the disk tier, not the server."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import httpx
import pytest

from warmkv.cache.config import CacheConfig
from warmkv.config_flags import add_serve_flags, settings_from
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.errors import WarmkvError
from warmkv.server.auth import resolve_api_key

from ..cache.test_disk_trouble import make_read_only
from .conftest import start_server

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def chat_body(messages: list[dict], **fields: object) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 3, "temperature": 0, **fields}


def post_chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_key_guards_metrics_and_docs_and_accepts_any_case_bearer(default_model) -> None:
    guarded = start_server(default_model, EngineConfig(kv_pool_tokens=2048), api_key="sekret")
    try:
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
            refused = httpx.get(f"{guarded.url}{path}")
            assert refused.status_code == 401, path
            assert refused.json()["error"]["code"] == "invalid_api_key"
            wrong = {"Authorization": "Bearer wrong"}
            assert httpx.get(f"{guarded.url}{path}", headers=wrong).status_code == 401
        for scheme in ("Bearer", "bearer", "BEARER"):
            headers = {"Authorization": f"{scheme} sekret"}
            assert httpx.get(f"{guarded.url}/metrics", headers=headers).status_code == 200
            assert httpx.get(f"{guarded.url}/v1/models", headers=headers).status_code == 200
        assert httpx.get(f"{guarded.url}/health").status_code == 200  # load balancers need no key
    finally:
        guarded.stop()


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return parser.parse_args(argv)


def test_api_key_from_environment_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from(serve_args()).api_key is None
    monkeypatch.setenv("WARMKV_API_KEY", "from-env")
    assert settings_from(serve_args()).api_key == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert settings_from(serve_args("--api-key-file", str(key_file))).api_key == "from-file"
    assert settings_from(serve_args("--api-key", "from-flag")).api_key == "from-flag"
    with pytest.raises(WarmkvError, match="--api-key-file"):
        resolve_api_key(None, str(tmp_path / "missing"))
    key_file.write_text("  \n")
    with pytest.raises(WarmkvError, match="empty"):
        resolve_api_key(None, str(key_file))


def test_prompt_text_reaches_logs_only_at_debug(server, caplog: pytest.LogCaptureFixture) -> None:
    secret = "My secret password is hunter2. " * 4
    with caplog.at_level(logging.DEBUG, logger="warmkv.server"):
        for variant in ("", "Also hunter3. "):
            messages = [{"role": "system", "content": secret + variant + "Be terse."}, *FRANCE]
            assert post_chat(server.url, chat_body(messages, cache_salt="s")).status_code == 200
    records = [r for r in caplog.records if r.name == "warmkv.server"]
    info = [r.getMessage() for r in records if r.levelno >= logging.INFO]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert any("system message #0 changed" in line for line in info)  # the miss is still explained
    assert not any("hunter" in line for line in info)
    assert any("hunter" in line for line in debug)


def test_a_disconnect_is_logged_at_info_without_a_traceback(server, caplog: pytest.LogCaptureFixture) -> None:
    body = chat_body(FRANCE, max_tokens=2000, ignore_eos=True)
    with caplog.at_level(logging.INFO):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 30
        while not any("client disconnected" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the disconnect was never noticed"
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_read_only_kv_dir_serves_from_memory_and_shows_the_tier_down(
    default_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = EngineConfig(kv_pool_tokens=4096, cache=CacheConfig(kv_dir=tmp_path))  # --kv-load auto
    writable = start_server(default_model, config)
    try:
        before = post_chat(writable.url, chat_body(FRANCE)).json()
    finally:
        writable.stop()
    make_read_only(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="warmkv.cache"):
        read_only = start_server(default_model, config)  # the start-up probe must not stop it
        try:
            for _ in range(2):
                response = post_chat(read_only.url, chat_body(FRANCE))
                assert response.status_code == 200
                assert response.json()["choices"] == before["choices"]
            metrics = httpx.get(f"{read_only.url}/metrics").text
        finally:
            read_only.stop()
    assert 'warmkv_cache_tier_up{tier="disk"} 0.0' in metrics
    assert 'warmkv_cache_tier_up{tier="live"} 1.0' in metrics
    assert sum("disk KV tier disabled" in r.getMessage() for r in caplog.records) == 1


def test_an_idle_server_writes_its_cache_to_disk_without_stopping(default_model, tmp_path: Path) -> None:
    """Written back (the default), nothing reaches the disk while requests run; once the server is idle
    (an agent's tool time) it writes what it computed, so a crash then loses none of it."""
    config = EngineConfig(kv_pool_tokens=4096, cache=CacheConfig(kv_dir=tmp_path))
    server = start_server(default_model, config)
    try:
        question = "Name the planets of the solar system, in order. " * 6
        body = chat_body([{"role": "user", "content": question}])
        usage = post_chat(server.url, body).json()["usage"]
        whole_blocks = (usage["prompt_tokens"] + usage["completion_tokens"] - 1) // 16  # the last is computed
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("*/*/*.kv"))) < whole_blocks and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(tmp_path.glob("*/*/*.kv"))) >= whole_blocks > 3
    finally:
        server.stop()


def test_failing_idle_time_disk_writes_never_stop_the_server(
    default_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self) -> float | None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(LLMEngine, "write_idle", broken)
    config = EngineConfig(kv_pool_tokens=4096, cache=CacheConfig(kv_dir=tmp_path))
    server = start_server(default_model, config)
    try:
        with caplog.at_level(logging.WARNING, logger="warmkv.engine"):
            assert post_chat(server.url, chat_body(FRANCE)).status_code == 200
            time.sleep(1.0)  # idle long enough for the writes to be tried
            assert post_chat(server.url, chat_body(FRANCE)).status_code == 200
    finally:
        server.stop()
    assert any("idle-time disk writes stopped" in r.getMessage() for r in caplog.records)
