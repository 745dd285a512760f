"""The `warmkv` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from warmkv.config_flags import HelpFormatter, add_engine_flags, add_serve_flags
from warmkv.errors import WarmkvError

# Handlers are named, not imported: a command loads torch and the model stack only when it runs, so
# `warmkv --help`, `warmkv router`, `warmkv report` and `warmkv cache` start at once.
Handler = str  # "module:function"


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling (unset: the model's generation_config.json, else greedy)"
    )
    group.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, help="0 is greedy")
    group.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to P")
    group.add_argument("--top-k", type=int, help="keep the K most likely tokens (0: no limit)")
    group.add_argument(
        "--repetition-penalty", type=float, help="above 1 discourages repeating tokens (1: none)"
    )
    group.add_argument("--seed", type=int, help="seed of the sampler (same seed, same text)")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _generate(args: argparse.Namespace) -> None:
    import logging
    import time

    from warmkv.chat.template import encode, render_chat
    from warmkv.config_flags import engine_config_from
    from warmkv.engine.llm_engine import LLMEngine
    from warmkv.engine.sampling import SamplingParams
    from warmkv.models.generation_config import generation_defaults

    config = engine_config_from(args)
    messages = None if args.raw and args.prompt else _messages(args)
    # progress of conversion, calibration and warm-up, on stderr like the stats line
    logging.basicConfig(level=logging.INFO, format="warmkv: %(message)s")
    engine = LLMEngine.from_config(config)
    model_defaults = generation_defaults(engine.model.folder)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=_given(args.temperature, model_defaults.temperature),
        top_p=_given(args.top_p, model_defaults.top_p),
        top_k=_given(args.top_k, model_defaults.top_k),
        repetition_penalty=_given(args.repetition_penalty, model_defaults.repetition_penalty),
        seed=args.seed,
        stop=args.stop,
    )
    _say(f"sampling: temperature {params.temperature:g}, top_p {params.top_p:g}, top_k {params.top_k}, "
         f"repetition_penalty {params.repetition_penalty:g} "
         f"(unset flags from {model_defaults.source})")  # fmt: skip
    tokenizer = engine.model.tokenizer
    prompt_ids = encode(tokenizer, args.prompt if messages is None else render_chat(tokenizer, messages))
    started = time.perf_counter()
    first_token_at = None
    completion_tokens = 0
    for output in engine.generate(prompt_ids, params):
        if output.token_ids and first_token_at is None:
            first_token_at = time.perf_counter()
        completion_tokens += len(output.token_ids)
        sys.stdout.write(output.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    _say(_stats_line(len(prompt_ids), completion_tokens, started, first_token_at, time.perf_counter()))


def _given(flag: float | int | None, model_default: float | int) -> float | int:
    return model_default if flag is None else flag


def _stats_line(prompt: int, completion: int, started: float, first: float | None, ended: float) -> str:
    ttft = f"{first - started:.2f} s" if first is not None else "-"
    # decode speed: tokens after the first over the time after it (the first token's time is TTFT)
    rate = (completion - 1) / (ended - first) if first is not None and completion > 1 and ended > first else 0
    return (f"{prompt} prompt tokens, {completion} completion tokens, TTFT {ttft}, "
            f"{rate:.1f} tok/s decode, {ended - started:.2f} s in all")  # fmt: skip


def _say(line: str) -> None:
    print(f"warmkv: {line}", file=sys.stderr)


def _messages(args: argparse.Namespace) -> list[dict]:
    if args.messages:
        try:
            messages = json.loads(Path(args.messages).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise WarmkvError(f"--messages {args.messages}: {err}") from err
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise WarmkvError(
                f"--messages {args.messages}: expected a JSON list of {{role, content}} objects"
            )
        return messages
    if args.prompt is None:
        raise WarmkvError("give a prompt (positional) or --messages FILE")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.prompt}]


def build_parser() -> argparse.ArgumentParser:
    from warmkv.bench.replay_flags import add_load_flags, add_replay_flags
    from warmkv.router.serve import add_router_flags

    parser = argparse.ArgumentParser(prog="warmkv", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Handler, help_text: str, into: Any = commands) -> argparse.ArgumentParser:
        sub = into.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        sub.set_defaults(handler=handler, command_parser=sub)  # (it names a stray flag with its own usage)
        return sub

    generate = command("generate", "warmkv.cli:_generate", "generate from a prompt or a messages file")
    generate.add_argument("prompt", nargs="?", help="the user message (or raw text with --raw)")
    generate.add_argument("--messages", help="JSON file with a list of chat messages")
    generate.add_argument("--system", help="system message to put before the prompt")
    generate.add_argument(
        "--raw", action="store_true", help="send the prompt as it is, without the chat template"
    )
    add_engine_flags(generate)
    add_sampling_flags(generate)

    serve = command("serve", "warmkv.cli:_serve", "serve the OpenAI-compatible HTTP API")
    add_engine_flags(serve)
    add_serve_flags(serve)

    cache = command("cache", "warmkv.cli:_cache", "inspect or clean the disk KV tier; explain a trace")
    cache.add_argument("action", choices=["stats", "ls", "clear", "verify", "explain"], help="what to do")
    cache.add_argument("trace", nargs="?", help="for explain: a file written by `warmkv serve --trace`")
    cache.add_argument(
        "--kv-dir", help="disk tier directory (default: kv/ in the user cache dir, or WARMKV_KV_DIR)"
    )

    report = command("report", "warmkv.cli:_report", "per-turn cache report of a warmkv.client log")
    report.add_argument("log", help="JSON-lines log written by WarmClient(log=...)")
    report.add_argument("--price-input", type=float, help="US$ per million uncached prompt tokens")
    report.add_argument("--price-cached", type=float, help="US$ per million cached prompt tokens")

    router = command(
        "router", "warmkv.router.serve:run_router", "route requests to the replica holding their prefix"
    )
    add_router_flags(router)

    bench = command("bench", "", "benchmarks").add_subparsers(dest="bench", required=True)
    replay = command(
        "replay", "warmkv.bench.run_replay:run", "replay agent traces; cache policies side by side vs the "
        "oracle", bench,
    )  # fmt: skip
    add_replay_flags(replay)
    load = command(
        "load", "warmkv.bench.run_load:run", "trace sessions at once: errors, TTFT, throughput per policy",
        bench,
    )  # fmt: skip
    add_load_flags(load)
    return parser


def _serve(args: argparse.Namespace) -> None:
    from warmkv.config_flags import engine_config_from, settings_from
    from warmkv.server.serve import check_port_free, run_server

    for flag in ("max_queue", "max_request_bytes", "max_messages"):
        if (value := getattr(args, flag)) < 1:
            raise WarmkvError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    check_port_free(args.host, args.port)  # before loading anything: a model load can take minutes
    config = engine_config_from(args)
    run_server(config, settings_from(args), args.host, args.port, args.max_queue, args.log_level)


def _report(args: argparse.Namespace) -> None:
    from warmkv.client.ledger import Prices
    from warmkv.client.report import report

    if not Path(args.log).is_file():
        raise WarmkvError(f"report needs a log file written by warmkv.client: {args.log}")
    if (args.price_input is None) != (args.price_cached is None):
        raise WarmkvError("give both --price-input and --price-cached, or neither")
    prices = Prices(args.price_input, args.price_cached) if args.price_input is not None else None
    try:
        print("\n".join(report(Path(args.log), prices)))
    except (ValueError, TypeError) as err:
        raise WarmkvError(f"{args.log} is not a warmkv.client log: {err}") from err


def _cache(args: argparse.Namespace) -> None:
    from warmkv.cache import admin
    from warmkv.cache.config import default_kv_dir

    kv_dir = Path(args.kv_dir) if args.kv_dir else default_kv_dir()
    if args.kv_dir and not kv_dir.is_dir():  # (the default one is made by the first server that runs)
        raise WarmkvError(f"--kv-dir {args.kv_dir}: no such folder")
    if args.action == "explain":
        if not args.trace:
            raise WarmkvError("cache explain needs a trace file written by `warmkv serve --trace`")
        if not Path(args.trace).is_file():
            raise WarmkvError(f"cache explain: no such trace file: {args.trace}")
        print("\n".join(admin.explain(Path(args.trace))))
    elif args.action == "clear":
        cleared = admin.clear(kv_dir)
        print(f"deleted {cleared.deleted_files} KV blocks ({cleared.deleted_bytes:,} bytes) from {kv_dir}")
        _print_left_alone(cleared.foreign)
    elif args.action == "verify":
        report = admin.verify(kv_dir)
        for path, reason in report.corrupt:
            print(f"corrupt, deleted: {path} ({reason})")
        print(f"checked {report.checked} KV blocks in {kv_dir}: {len(report.corrupt)} corrupt "
              f"(deleted, {report.deleted_bytes:,} bytes)")  # fmt: skip
        _print_left_alone(report.foreign)
        if report.corrupt:
            raise WarmkvError(f"found {len(report.corrupt)} corrupt KV blocks in {kv_dir}")
    else:
        print("\n".join((admin.stats if args.action == "stats" else admin.listing)(kv_dir)))


def _print_left_alone(foreign: list[Path], shown: int = 10) -> None:
    if foreign:
        names = ", ".join(str(p) for p in foreign[:shown]) + (" ..." if len(foreign) > shown else "")
        print(f"left alone {len(foreign)} entries that are not warmkv KV blocks: {names}")


def main(argv: list[str] | None = None) -> None:
    args, stray = build_parser().parse_known_args(argv)
    if stray:  # argparse reports a subcommand's stray flag with the top-level usage: `serve --help`'s here
        args.command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
    module, function = args.handler.split(":")
    try:
        getattr(importlib.import_module(module), function)(args)
    except WarmkvError as err:
        sys.exit(f"warmkv: error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
