"""`warmkv serve`: load the model, start the engine thread, run the HTTP server until Ctrl-C / SIGTERM."""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING

from warmkv.errors import WarmkvError

if TYPE_CHECKING:
    from warmkv.engine.config import EngineConfig
    from warmkv.server.app import ServerSettings

LOG_LEVELS = ("debug", "info", "warning", "error")  # --log-level of serve and router


def run_server(
    config: EngineConfig, settings: ServerSettings, host: str, port: int, max_queue: int, log_level: str
) -> None:
    """Load the model and serve until Ctrl-C / SIGTERM (the caller checked the port: check_port_free)."""
    import uvicorn

    from warmkv.engine.async_engine import AsyncEngine
    from warmkv.engine.llm_engine import LLMEngine
    from warmkv.server.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = AsyncEngine(LLMEngine.from_config(config), max_queue)
    app = create_app(engine, settings)
    # uvicorn stops accepting on SIGINT/SIGTERM, lets in-flight requests finish (bounded), then the app's
    # lifespan shuts the engine down
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=30))  # fmt: skip

    def stop_serving(reason: str) -> None:  # from the engine thread: uvicorn polls the flag
        server.should_exit = True

    engine.on_failure = stop_serving
    server.run()
    if engine.failure is not None:  # a dead engine is a failed server: exit non-zero for the supervisor
        raise WarmkvError(engine.failure)


def check_port_free(host: str, port: int) -> None:
    """Bind and release the address as uvicorn will bind it (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    if not 0 <= port <= 65535:
        raise WarmkvError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise WarmkvError(f"--host {host}: {err.strerror}") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise WarmkvError(
                    f"--port {port}: {host}:{port} is already in use (another server?); choose another --port"
                ) from err
            raise WarmkvError(f"--host {host} --port {port}: cannot listen there: {err.strerror}") from err
