"""The `warmkv` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from warmkv.cache.config import CacheConfig, LoadPolicy, default_kv_dir
from warmkv.cache.hit_policy import HitPolicyConfig, HitPolicyName
from warmkv.chat.template import encode, render_chat
from warmkv.engine.config import EngineConfig
from warmkv.engine.sampling import SamplingParams
from warmkv.errors import WarmkvError


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    group = parser.add_argument_group("model and engine")
    group.add_argument(
        "--model", help="model folder (Hugging Face layout) or .gguf file; default SmolLM2-135M-Instruct"
    )
    group.add_argument(
        "--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default %(default)s)"
    )
    group.add_argument("--dtype", default=defaults.dtype, help="auto, float32, bfloat16 or float16")
    group.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    pool = group.add_mutually_exclusive_group()
    pool.add_argument("--kv-pool-tokens", type=int, help="KV pool size in tokens")
    pool.add_argument(
        "--kv-pool-gib", type=float, help="KV pool size in GiB (default 2 on CPU, 85%% of free GPU)"
    )
    group.add_argument(
        "--max-batch-tokens", type=int, default=defaults.max_batch_tokens, help="tokens per step"
    )
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="sequences per batch")
    group.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    group.add_argument("--no-prefix-cache", action="store_true", help="recompute every prompt in full")
    group.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA")
    tiers = parser.add_argument_group("prefix-cache tiers")
    host = tiers.add_mutually_exclusive_group()
    host.add_argument(
        "--host-cache-gib", type=float, help="host RAM tier size in GiB (default 4; 0 disables)"
    )
    host.add_argument("--host-cache-tokens", type=int, help="host RAM tier size in tokens")
    tiers.add_argument("--no-disk-cache", action="store_true", help="keep no KV on disk")
    tiers.add_argument("--kv-dir", help="disk tier directory (default: kv/ in the user cache dir)")
    tiers.add_argument(
        "--kv-dir-mode",
        type=_octal,
        default=CacheConfig().kv_file_mode,
        help="mode of KV files, octal (default 600: the owner only; 640 or 660 for a shared group); "
        "folders get the matching search bits",
    )
    disk = tiers.add_mutually_exclusive_group()
    disk.add_argument("--disk-cache-gib", type=float, help="disk tier size in GiB (default 20)")
    disk.add_argument("--disk-cache-tokens", type=int, help="disk tier size in tokens")
    tiers.add_argument("--redis-url", help="shared tier of many replicas: redis://HOST:PORT/DB")
    tiers.add_argument("--redis-cluster", action="store_true", help="--redis-url names a Redis Cluster node")
    tiers.add_argument("--redis-ttl", type=int, default=24 * 3600, help="seconds a shared block lives")
    tiers.add_argument(
        "--redis-timeout", type=float, default=0.5, help="seconds before the shared tier counts as down"
    )
    tiers.add_argument(
        "--kv-load",
        choices=[p.value for p in LoadPolicy],
        default=LoadPolicy.AUTO.value,
        help="auto: load from host/disk only when faster than recomputing (default)",
    )
    rules = parser.add_argument_group("other caches' reuse rules, for side-by-side benchmarks")
    hit = HitPolicyConfig()
    rules.add_argument(
        "--hit-policy",
        choices=[p.value for p in HitPolicyName],
        default=hit.name.value,
        help="blocks: any cached prefix (default); checkpoints: ds4-style; units: DeepSeek-API-style",
    )
    rules.add_argument("--checkpoint-align", type=int, default=hit.checkpoint_align, help="tokens")
    rules.add_argument("--checkpoint-interval", type=int, default=hit.checkpoint_interval, help="tokens")
    rules.add_argument("--cache-unit", type=int, default=hit.unit, help="tokens per unit")


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 600") from None


def engine_config_from(args: argparse.Namespace) -> EngineConfig:
    for flag in ("block_size", "max_batch_tokens", "max_num_seqs", "kv_pool_tokens", "max_model_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise WarmkvError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    for flag in ("host_cache_gib", "host_cache_tokens", "disk_cache_gib", "disk_cache_tokens", "kv_pool_gib"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise WarmkvError(f"--{flag.replace('_', '-')} must not be negative, got {value}")
    if args.redis_ttl < 1 or args.redis_timeout <= 0:
        raise WarmkvError("--redis-ttl and --redis-timeout must be positive")
    for flag in ("checkpoint_align", "checkpoint_interval", "cache_unit"):
        value = getattr(args, flag)
        if value < args.block_size or value % args.block_size:
            name = flag.replace("_", "-")
            raise WarmkvError(f"--{name} must be a multiple of --block-size {args.block_size}, got {value}")
    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_pool_tokens=args.kv_pool_tokens,
        kv_pool_gib=args.kv_pool_gib,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        prefix_cache=not args.no_prefix_cache,
        cuda_graphs=not args.no_cuda_graphs,
        cache=CacheConfig(
            host_gib=args.host_cache_gib,
            host_tokens=args.host_cache_tokens,
            disk=not args.no_disk_cache,
            kv_dir=Path(args.kv_dir) if args.kv_dir else None,
            kv_file_mode=args.kv_dir_mode,
            disk_gib=args.disk_cache_gib,
            disk_tokens=args.disk_cache_tokens,
            load_policy=LoadPolicy(args.kv_load),
            redis_url=args.redis_url,
            redis_cluster=args.redis_cluster,
            redis_ttl_s=args.redis_ttl,
            redis_timeout_s=args.redis_timeout,
            hit_policy=HitPolicyConfig(
                HitPolicyName(args.hit_policy), args.checkpoint_align, args.checkpoint_interval, 64,
                args.cache_unit,
            ),
        ),
    )


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _generate(args: argparse.Namespace) -> None:
    from warmkv.engine.llm_engine import LLMEngine

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    engine = LLMEngine.from_config(engine_config_from(args))
    tokenizer = engine.model.tokenizer
    text = args.prompt if args.raw and args.prompt else render_chat(tokenizer, _messages(args))
    for output in engine.generate(encode(tokenizer, text), params):
        sys.stdout.write(output.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


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
    parser = argparse.ArgumentParser(prog="warmkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate from a prompt or a messages file, streaming")
    generate.add_argument("prompt", nargs="?", help="the user message (or raw text with --raw)")
    generate.add_argument("--messages", help="JSON file with a list of chat messages")
    generate.add_argument("--system", help="system message to put before the prompt")
    generate.add_argument(
        "--raw", action="store_true", help="send the prompt as it is, without the chat template"
    )
    add_engine_flags(generate)
    add_sampling_flags(generate)
    generate.set_defaults(handler=_generate)

    from warmkv.server.serve import add_serve_flags, serve

    serve_parser = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_flags(serve_parser)
    add_serve_flags(serve_parser)
    serve_parser.set_defaults(handler=serve)

    cache = commands.add_parser("cache", help="inspect or clean the disk KV tier; explain a request trace")
    cache.add_argument("action", choices=["stats", "ls", "clear", "verify", "explain"])
    cache.add_argument("trace", nargs="?", help="for explain: a file written by `warmkv serve --trace`")
    cache.add_argument("--kv-dir", help="disk tier directory (default: kv/ in the user cache dir)")
    cache.set_defaults(handler=_cache)

    report = commands.add_parser("report", help="per-turn cache report of a log written by warmkv.client")
    report.add_argument("log", help="JSON-lines log written by WarmClient(log=...)")
    report.add_argument("--price-input", type=float, help="US$ per million uncached prompt tokens")
    report.add_argument("--price-cached", type=float, help="US$ per million cached prompt tokens")
    report.set_defaults(handler=_report)

    from warmkv.router.serve import add_router_flags, run_router

    router = commands.add_parser("router", help="route requests to the replica holding their cached prefix")
    add_router_flags(router)
    router.set_defaults(handler=run_router)

    from warmkv.bench.run_replay import add_replay_flags, run

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    replay = bench.add_parser("replay", help="replay agent traces; cache policies side by side vs the oracle")
    add_replay_flags(replay)
    replay.set_defaults(handler=run)
    return parser


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

    kv_dir = Path(args.kv_dir) if args.kv_dir else default_kv_dir()
    if args.action == "explain":
        if not args.trace or not Path(args.trace).is_file():
            raise WarmkvError(
                f"cache explain needs a trace file written by `warmkv serve --trace`: {args.trace}"
            )
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
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except WarmkvError as err:
        sys.exit(f"warmkv: error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
