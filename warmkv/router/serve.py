"""`warmkv router --replica URL ...`: run the prefix-affinity router until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging

from warmkv.errors import WarmkvError
from warmkv.server.serve import LOG_LEVELS, check_port_free


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replica", action="append", required=True, help="base URL of a replica; repeat for each"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--balance-slack", type=int, default=4, help="in-flight requests a session's replica may have "
        "beyond the least busy one before the session moves",
    )  # fmt: skip
    parser.add_argument("--down-seconds", type=float, default=10.0, help="how long a failed replica rests")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def run_router(args: argparse.Namespace) -> None:
    import uvicorn

    from warmkv.router.affinity import Router
    from warmkv.router.app import create_router_app

    check_port_free(args.host, args.port)  # one line naming the flag, as serve says it
    if args.balance_slack < 0 or args.down_seconds <= 0:
        raise WarmkvError("--balance-slack must be >= 0 and --down-seconds > 0")
    bad = [url for url in args.replica if not url.startswith(("http://", "https://"))]
    if bad:
        raise WarmkvError(f"--replica needs an http:// or https:// URL, got {', '.join(bad)}")
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format)
    router = Router(args.replica, args.balance_slack, args.down_seconds)
    uvicorn.run(create_router_app(router), host=args.host, port=args.port, log_level=args.log_level)
