"""`warmkv serve`: load the model, start the engine thread, run the HTTP server until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from warmkv.errors import WarmkvError
from warmkv.server.app import ServerSettings
from warmkv.server.auth import resolve_api_key


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on /v1, /metrics and the docs (visible in `ps`: prefer "
        "--api-key-file or $WARMKV_API_KEY)",
    )
    group.add_argument("--api-key-file", help="read the API key from this file")
    group.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    group.add_argument("--chat-template", help="Jinja chat template file overriding the model's own")
    group.add_argument("--tool-parser", default="hermes", help="tool-call format of the model's output")
    group.add_argument("--max-queue", type=int, default=256, help="pending requests before answering 429")
    limits = ServerSettings()
    group.add_argument(
        "--max-request-bytes", type=int, default=limits.max_request_bytes,
        help=f"larger request bodies get 413 (default {limits.max_request_bytes:,})",
    )  # fmt: skip
    group.add_argument(
        "--max-messages", type=int, default=limits.max_messages,
        help=f"chat requests with more messages get 400 (default {limits.max_messages})",
    )  # fmt: skip
    group.add_argument("--trace", help="append one JSON line per request to this file")
    group.add_argument(
        "--no-predictive-prefill",
        action="store_true",
        help="do not prefill the history a client will resend after a reply with tool calls",
    )
    group.add_argument(
        "--no-stable-tokens",
        action="store_true",
        help="tokenise each prompt's text whole, as text-keyed caches do (for comparisons)",
    )
    group.add_argument("--log-level", default="info")


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from warmkv.cli import engine_config_from
    from warmkv.engine.async_engine import AsyncEngine
    from warmkv.engine.llm_engine import LLMEngine
    from warmkv.server.app import create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for flag in ("max_queue", "max_request_bytes", "max_messages"):
        if (value := getattr(args, flag)) < 1:
            raise WarmkvError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    engine = AsyncEngine(LLMEngine.from_config(engine_config_from(args)), args.max_queue)
    app = create_app(engine, settings_from(args))
    # uvicorn stops accepting on SIGINT/SIGTERM, lets in-flight requests finish (bounded), then the app's
    # lifespan shuts the engine down
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        api_key=resolve_api_key(args.api_key, args.api_key_file),
        served_model_name=args.served_model_name,
        chat_template=_read_template(args.chat_template),
        tool_parser=args.tool_parser,
        predictive_prefill=not args.no_predictive_prefill,
        stable_tokens=not args.no_stable_tokens,
        trace=Path(args.trace) if args.trace else None,
        max_request_bytes=args.max_request_bytes,
        max_messages=args.max_messages,
    )


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as err:
        raise WarmkvError(f"--chat-template {path}: {err}") from err
