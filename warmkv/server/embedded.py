"""A warmkv server (or the router) on a loopback port inside this process, for benchmarks and tests."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from openai import OpenAI

from warmkv.engine.async_engine import AsyncEngine
from warmkv.engine.llm_engine import LLMEngine
from warmkv.server.app import ServerSettings, create_app


@dataclass
class ThreadedServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, api_key: str = "unused", **options: object) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    def stop(self) -> None:
        """Stop serving; a warmkv app's engine shuts down with it, flushing its disk writer."""
        self.server.should_exit = True
        self.thread.join(timeout=60)


@dataclass
class EmbeddedServer(ThreadedServer):
    engine: AsyncEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app: FastAPI) -> ThreadedServer:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the embedded server did not start")
        time.sleep(0.05)
    return ThreadedServer(f"http://127.0.0.1:{port}", server, thread)


def start_embedded_server(
    engine: LLMEngine, settings: ServerSettings | None = None, max_pending: int = 256
) -> EmbeddedServer:
    async_engine = AsyncEngine(engine, max_pending)
    running = serve_in_thread(create_app(async_engine, settings or ServerSettings()))
    return EmbeddedServer(running.url, running.server, running.thread, async_engine)
