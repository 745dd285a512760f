"""Command-line flags of the engine, its cache and the server, and the config objects built from them.

The one place flags become configs: `warmkv generate`, `warmkv serve` and the replay benchmark share it.
Importing it is cheap (no torch, no server stack), so `warmkv --help` answers at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from warmkv.cache.config import CacheConfig, DiskWrite, LoadPolicy
from warmkv.cache.hit_policy import HitPolicyConfig, HitPolicyName
from warmkv.engine.config import EngineConfig
from warmkv.errors import WarmkvError
from warmkv.server.limits import API_KEY_ENV, DEFAULT_MAX_MESSAGES, DEFAULT_MAX_REQUEST_BYTES
from warmkv.server.serve import LOG_LEVELS

if TYPE_CHECKING:
    from warmkv.server.app import ServerSettings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (unset, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        if not action.help:
            action.help = " "  # argparse adds the default only to flags that have a help text
        return super()._get_help_string(action) or ""


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    group = parser.add_argument_group("model and engine")
    group.add_argument(
        "--model", help="model folder (Hugging Face layout) or .gguf file; default SmolLM2-135M-Instruct"
    )
    group.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--dtype", default=defaults.dtype, help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 "
        "or float16",
    )  # fmt: skip
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
    group.add_argument("--no-cuda-graphs", action="store_true", help="run forward passes eagerly on CUDA")
    group.add_argument(
        "--decode-steps", type=int, help="decode steps run back to back before the host reads their "
        "tokens (default 4 on CUDA, 1 on CPU; 1 turns it off)",
    )  # fmt: skip
    _add_tier_flags(parser, defaults.cache)
    rules = parser.add_argument_group("other caches' reuse rules, for side-by-side benchmarks")
    hit = HitPolicyConfig(HitPolicyName.BLOCKS)  # for its default sizes
    rules.add_argument(
        "--hit-policy",
        choices=[p.value for p in HitPolicyName],
        default=HitPolicyName.BLOCKS.value,
        help="blocks: any cached prefix (warmkv); checkpoints: ds4-style; units: DeepSeek-API-style",
    )
    rules.add_argument(
        "--checkpoint-align", type=int, help=f"tokens (default {hit.checkpoint_align}, rounded up to whole "
        "blocks; checkpoints only)",
    )  # fmt: skip
    rules.add_argument(
        "--checkpoint-interval", type=int, help=f"tokens (default {hit.checkpoint_interval}, rounded up to "
        "whole blocks; checkpoints only)",
    )  # fmt: skip
    rules.add_argument(
        "--cache-unit", type=int, help=f"tokens per unit (default {hit.unit}, rounded up to whole blocks; "
        "units only)",
    )  # fmt: skip


def _add_tier_flags(parser: argparse.ArgumentParser, defaults: CacheConfig) -> None:
    tiers = parser.add_argument_group("prefix-cache tiers")
    host = tiers.add_mutually_exclusive_group()
    host.add_argument(
        "--host-cache-gib", type=float, help="host RAM tier size in GiB (default 4; 0 disables)"
    )
    host.add_argument("--host-cache-tokens", type=int, help="host RAM tier size in tokens")
    tiers.add_argument("--no-disk-cache", action="store_true", help="keep no KV on disk")
    tiers.add_argument(
        "--kv-dir", help="disk tier directory (default: kv/ in the user cache dir, or WARMKV_KV_DIR)"
    )
    tiers.add_argument(
        "--kv-dir-mode",
        type=_octal,
        default=f"{defaults.kv_file_mode:o}",  # parsed by _octal, and shown in --help as written
        help="mode of KV files, octal (600: the owner only; 640 or 660 for a shared group); folders get "
        "the matching search bits",
    )
    tiers.add_argument(
        "--kv-disk-write",
        choices=[w.value for w in DiskWrite],
        default=defaults.disk_write.value,
        help="back: blocks are written while the engine is idle, as they enter a host tier more than 7/8 "
        "full (or leave the GPU pool, without a host tier), as the host tier evicts them, and at shutdown "
        "(a crash loses what was computed since the engine was last idle and is still in memory); "
        "through: every block as it is computed (survives any crash, costs throughput under load); "
        "either way a full writer queue skips a write",
    )
    disk = tiers.add_mutually_exclusive_group()
    disk.add_argument("--disk-cache-gib", type=float, help="disk tier size in GiB (default 20)")
    disk.add_argument("--disk-cache-tokens", type=int, help="disk tier size in tokens")
    tiers.add_argument("--redis-url", help="shared tier of many replicas: redis://HOST:PORT/DB")
    tiers.add_argument("--redis-cluster", action="store_true", help="--redis-url names a Redis Cluster node")
    tiers.add_argument(
        "--redis-ttl", type=int, default=defaults.redis_ttl_s, help="seconds a shared block lives"
    )
    tiers.add_argument(
        "--redis-timeout",
        type=float,
        default=defaults.redis_timeout_s,
        help="seconds before the shared tier counts as down",
    )
    tiers.add_argument(
        "--kv-load",
        choices=[p.value for p in LoadPolicy],
        default=defaults.load_policy.value,
        help="auto: load from host/disk only when faster than recomputing; always: always load",
    )
    tiers.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure load-or-recompute costs again (else measured once per machine, model and device)",
    )


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 600") from None


def engine_config_from(args: argparse.Namespace) -> EngineConfig:
    for flag in ("block_size", "max_batch_tokens", "max_num_seqs", "kv_pool_tokens", "max_model_len",
                 "decode_steps"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise WarmkvError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    for flag in ("host_cache_gib", "host_cache_tokens", "disk_cache_gib", "disk_cache_tokens", "kv_pool_gib"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise WarmkvError(f"--{flag.replace('_', '-')} must not be negative, got {value}")
    if args.redis_ttl < 1 or args.redis_timeout <= 0:
        raise WarmkvError("--redis-ttl and --redis-timeout must be positive")
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
        decode_steps=args.decode_steps,
        hit_emulation=hit_policy_from(args),
        cache=CacheConfig(
            host_gib=args.host_cache_gib,
            host_tokens=args.host_cache_tokens,
            disk=not args.no_disk_cache,
            kv_dir=Path(args.kv_dir) if args.kv_dir else None,
            kv_file_mode=args.kv_dir_mode,
            disk_gib=args.disk_cache_gib,
            disk_tokens=args.disk_cache_tokens,
            disk_write=DiskWrite(args.kv_disk_write),
            load_policy=LoadPolicy(args.kv_load),
            recalibrate=args.recalibrate,
            redis_url=args.redis_url,
            redis_cluster=args.redis_cluster,
            redis_ttl_s=args.redis_ttl,
            redis_timeout_s=args.redis_timeout,
        ),
    )


def hit_policy_from(args: argparse.Namespace) -> HitPolicyConfig | None:
    """The emulation `--hit-policy` asks for; None for warmkv's own rule (blocks). A size given for a policy
    that does not use it is refused; unset sizes follow the block size."""
    name = HitPolicyName(args.hit_policy)
    defaults = HitPolicyConfig(name)
    used = {
        HitPolicyName.BLOCKS: (),
        HitPolicyName.CHECKPOINTS: ("checkpoint_align", "checkpoint_interval"),
        HitPolicyName.UNITS: ("cache_unit",),
    }[name]
    sizes = {}
    for flag, default in (
        ("checkpoint_align", defaults.checkpoint_align),
        ("checkpoint_interval", defaults.checkpoint_interval),
        ("cache_unit", defaults.unit),
    ):
        value, option = getattr(args, flag), "--" + flag.replace("_", "-")
        if value is None:
            value = -(-default // args.block_size) * args.block_size
        elif flag not in used:
            raise WarmkvError(f"{option} applies only to --hit-policy {_user_of(flag)}")
        elif value < args.block_size or value % args.block_size:
            raise WarmkvError(f"{option} must be a multiple of --block-size {args.block_size}, got {value}")
        sizes[flag] = value
    if name is HitPolicyName.BLOCKS:
        return None
    return HitPolicyConfig(
        name, sizes["checkpoint_align"], sizes["checkpoint_interval"], defaults.checkpoint_slots,
        sizes["cache_unit"],
    )  # fmt: skip


def _user_of(flag: str) -> str:
    return "units" if flag == "cache_unit" else "checkpoints"


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` (or `x-api-key`) on /v1, /metrics and the docs (visible "
        f"in `ps`: prefer --api-key-file or ${API_KEY_ENV})",
    )
    group.add_argument("--api-key-file", help="read the API key from this file")
    group.add_argument("--served-model-name", help="the model id clients send (default: the model's name)")
    group.add_argument("--chat-template", help="Jinja chat template file overriding the model's own")
    group.add_argument("--tool-parser", default="hermes", help="tool-call format of the model's output")
    group.add_argument("--max-queue", type=int, default=256, help="pending requests before answering 429")
    group.add_argument(
        "--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413, refused while they arrive",
    )  # fmt: skip
    group.add_argument(
        "--max-messages", type=int, default=DEFAULT_MAX_MESSAGES,
        help="chat requests with more messages get 400, before rendering",
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
    group.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, help="server log level"
    )


def settings_from(args: argparse.Namespace) -> ServerSettings:
    from warmkv.server.app import ServerSettings
    from warmkv.server.auth import resolve_api_key

    return ServerSettings(
        api_key=resolve_api_key(args.api_key, args.api_key_file),
        served_model_name=args.served_model_name,
        chat_template=_read_template(args.chat_template),
        tool_parser=args.tool_parser,
        predictive_prefill=not args.no_predictive_prefill,
        stable_tokens=not args.no_stable_tokens,
        trace=_trace_file(args.trace),
        max_request_bytes=args.max_request_bytes,
        max_messages=args.max_messages,
    )


def _trace_file(path: str | None) -> Path | None:
    """The --trace file, known to take lines before the model loads (a folder that does not exist was a
    traceback once the model had loaded)."""
    if path is None:
        return None
    try:
        with Path(path).open("a", encoding="utf-8"):
            pass
    except OSError as err:
        raise WarmkvError(f"--trace {path}: {err.strerror or err}") from err
    return Path(path)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as err:
        raise WarmkvError(f"--chat-template {path}: {err}") from err


def serve_configs(flags: list[str]) -> tuple[EngineConfig, ServerSettings]:
    """The engine config and server settings `warmkv serve FLAGS` would run with."""
    parser = argparse.ArgumentParser(prog="warmkv serve", exit_on_error=False)
    add_engine_flags(parser)
    add_serve_flags(parser)
    try:
        args = parser.parse_args(flags)
    except argparse.ArgumentError as err:
        raise WarmkvError(str(err)) from err
    return engine_config_from(args), settings_from(args)
