"""The `warmkv bench replay` command: trace in, policies side by side, table + JSON + plots out."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
import torch

from warmkv.bench.oracle import oracle_hits, peer_oracle
from warmkv.bench.peers import Peer, UrlPeer, gguf_of, make_peer, peer_names
from warmkv.bench.policies import Capacities, ClusterVariant, Policy, cluster_variants, policies
from warmkv.bench.redis_process import RedisProcess
from warmkv.bench.replay import Cluster, free_gpu_for_peer, replay_embedded, replay_on_peer
from warmkv.bench.results import oracle_row, plot, plots_available, shape_table, summarize, table, write_json
from warmkv.bench.synthetic import SHAPES, synthetic_trace
from warmkv.bench.trace import TraceRequest, load_trace
from warmkv.errors import WarmkvError

BLOCK = 16


def run(args: argparse.Namespace) -> None:
    if not args.no_plots and not plots_available():  # known before a replay of minutes, not after
        raise WarmkvError("the plots need matplotlib: pip install 'warmkv[bench]', or pass --no-plots")
    requests = requests_from(args)
    peers = peer_names(args.peer, args.url, args.shape)
    rows: dict[str, dict[str, Any]] = {}
    caps, model, device_label = None, None, "url"
    if not args.url:  # warmkv's rows: the oracle over warmkv's own rendering
        tokenizer, template, model, device_label = model_and_tokenizer(args)
        prompts = [prompt_ids(tokenizer, template, r) for r in requests]
        oracle = oracle_hits(prompts)
        caps = _capacities(args, prompts, oracle)
        rows["oracle"] = oracle_row([len(p) for p in prompts], oracle)
    model_label = model.name if model else args.url
    workload = args.context if args.synthetic or not args.traces else "trace"
    workload = f"{workload}-{args.replicas}-replicas" if args.replicas > 1 else workload
    stem = Path(args.out) / (args.name or slug(f"replay-{device_label}-{model_label}-{workload}"))
    json_path = stem.with_name(f"{stem.name}.json")
    result = {
        "device": device_label,
        "model": model_label,
        "trace": {"files": args.traces, "synthetic": args.synthetic, "context": args.context,
                  "requests": len(requests), "sessions": len({r.session for r in requests})},
        "capacities": asdict(caps) if caps else None,
        "rows": rows,
        "command": "warmkv bench replay " + " ".join(sys.argv[3:]),
    }  # fmt: skip

    def add_row(name: str, row: dict[str, Any]) -> None:
        """Written as each row comes, so a run cut short keeps what it measured."""
        rows[name] = row
        for oracle_name in [n for n in rows if n.startswith("oracle")]:  # the oracles last
            rows[oracle_name] = rows.pop(oracle_name)
        write_json(result, json_path)

    if args.url:
        peer = UrlPeer(name="url", model=args.served_model or first_model(args), base_url=args.url,
                       api_key=args.api_key)  # fmt: skip
        _run_peer(peer, requests, args.max_gap, rows, add_row)
    else:
        assert caps is not None and model is not None
        _run_embedded(args, model, caps, requests, oracle, add_row)
        for name in peers:
            free_gpu_for_peer()
            with make_peer(name, model.name, gguf_of(args.model), model.folder) as peer:
                _run_peer(peer, requests, args.max_gap, rows, add_row)
    print("\n".join(table(rows)))
    print()
    print("\n".join(shape_table(rows)))
    print("wrote", json_path, *([] if args.no_plots else plot(rows, stem)))


def _run_peer(peer: Peer, requests: list[TraceRequest], max_gap_s: float, rows: dict[str, Any],
              add_row: Callable[[str, dict[str, Any]], None]) -> None:  # fmt: skip
    """The peer's row, judged against an oracle of its own prompt tokens; `oracle_<peer>` beside it."""
    with peer.http() as http:
        oracle = peer_oracle(peer.tokenizer(http), requests)
    turns = replay_on_peer(peer, requests, max_gap_s)
    row = summarize(turns, oracle.clipped(turns))
    row["oracle_source"] = f"{peer.name}'s own prompt tokens ({oracle.dialect})"
    row["prompt_length_mismatches"] = oracle.mismatches(turns)
    rows[f"oracle_{peer.name}"] = oracle_row(oracle.lengths, oracle.hits)
    add_row(peer.name, row)


def _run_embedded(args: argparse.Namespace, model: Any, caps: Capacities, requests: list[TraceRequest],
                  oracle: list[int], add_row: Callable[[str, dict[str, Any]], None]) -> None:  # fmt: skip
    common = ["--kv-pool-tokens", str(caps.pool_tokens), "--max-batch-tokens", str(args.max_batch_tokens),
              "--device", args.device, "--dtype", args.dtype]  # fmt: skip
    store = RedisProcess() if args.replicas > 1 and not args.redis_url else None
    try:
        if args.replicas > 1:
            runs = _cluster_runs(args, caps, args.redis_url or store.url)  # type: ignore[union-attr]
        else:
            runs = [(name, policy, Cluster) for name, policy in select_policies(args, caps).items()]
        for name, policy, cluster in runs:
            flags = [*common, *policy.flags]
            turns = replay_embedded(model, flags, requests, args.max_gap, name, cluster())
            add_row(name, {"description": policy.description, "flags": flags} | summarize(turns, oracle))
    finally:
        if store is not None:
            store.stop()


def requests_from(args: argparse.Namespace) -> list[TraceRequest]:
    requests = [r for path in args.traces for r in load_trace(Path(path))]
    if args.synthetic or not args.traces:
        shapes = list(SHAPES) if args.synthetic in (None, "all") else args.synthetic.split(",")
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise WarmkvError(f"--synthetic: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
        if args.context < 200:
            raise WarmkvError(f"--context must be at least 200 tokens, got {args.context}")
        requests += synthetic_trace(shapes, args.context, args.seed)
    return requests


def model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, str, Any, str]:
    from warmkv.engine.config import EngineConfig
    from warmkv.models.random_init import model_or_shape

    config = EngineConfig(device=args.device, dtype=args.dtype)
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    model = model_or_shape(args.model, args.shape, args.tokenizer, device, dtype)

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return model.tokenizer, model.tokenizer.chat_template, model, label


def prompt_ids(tokenizer: Any, template: str, request: TraceRequest) -> list[int]:
    from warmkv.chat.prompt import build_chat_prompt
    from warmkv.chat.tool_calls import PARSERS

    prompt = build_chat_prompt(tokenizer, template, PARSERS["hermes"], request.messages, request.tools, None)
    return prompt.token_ids


def _capacities(args: argparse.Namespace, prompts: list[list[int]], oracle: list[int]) -> Capacities:
    """The GPU tier holds the longest request, and less than the working set (the tokens no earlier
    request had), so the lower tiers matter."""
    longest = max(len(p) for p in prompts)
    working_set = sum(len(p) for p in prompts) - sum(oracle)
    pool = max(longest + 256, min(2 * longest + 256, working_set // 2))
    pool = args.pool_tokens or -(-pool // BLOCK) * BLOCK
    align = max(BLOCK, args.context // 8 // BLOCK * BLOCK)
    return Capacities(pool, args.host_tokens if args.host_tokens is not None else 4 * pool, align, 2 * align)


def select_policies(args: argparse.Namespace, caps: Capacities) -> dict[str, Any]:
    known = policies(caps)
    names = list(known) if args.policies == "all" else args.policies.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WarmkvError(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(known)}, all")
    return {n: known[n] for n in names}


Run = tuple[str, Policy, Callable[[], Cluster]]


def _cluster_runs(args: argparse.Namespace, caps: Capacities, redis_url: str) -> list[Run]:
    """warmkv on N replicas: round-robin or routed, each with and without the shared tier."""
    warmkv = policies(caps)["warmkv"]
    runs: list[Run] = []
    for variant in cluster_variants(args.replicas):

        def cluster(variant: ClusterVariant = variant) -> Cluster:
            if variant.shared:  # every row starts from an empty shared tier
                redis.Redis.from_url(redis_url).flushdb()
            return Cluster(args.replicas, variant.routed, redis_url if variant.shared else None)

        runs.append((variant.name, Policy(variant.name, variant.description, warmkv.flags), cluster))
    return runs


def first_model(args: argparse.Namespace) -> str:
    from openai import OpenAI

    return OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0).models.list().data[0].id


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")
