"""The `warmkv bench load` command: trace sessions run concurrently against warmkv policies (embedded, on
one loaded model), real peer servers beside them (`--peer`, on the same weights, same sessions and client),
or any `--url`; errors, TTFT, latency and throughput per row; table + JSON + plot."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from warmkv.bench.load import (
    SCHEDULER_METRICS,
    Endpoint,
    LoadShape,
    by_session,
    measure_load,
    multiply_sessions,
    no_wait,
    run_load,
    summarize_load,
    warm_up_turns,
)
from warmkv.bench.oracle import oracle_hits, peer_oracle
from warmkv.bench.peers import gguf_of, make_peer, peer_names
from warmkv.bench.policies import Capacities, policies
from warmkv.bench.replay import embedded_warmkv, free_gpu_for_peer, stop_embedded
from warmkv.bench.replay_flags import DEFAULT_LOAD_POLICIES
from warmkv.bench.replicas import Cluster, ModelSpec, ReplicaIdentity, ReplicaProcess, replica_gpus, row_names
from warmkv.bench.results import write_json
from warmkv.bench.run_replay import BLOCK, first_model, model_and_tokenizer, prompt_ids, requests_from, slug
from warmkv.bench.trace import TraceRequest
from warmkv.errors import WarmkvError
from warmkv.models.loader import load_tokenizer


def run(args: argparse.Namespace) -> None:
    peers = _check(args)
    base = requests_from(args)
    requests = multiply_sessions(base, args.copies)
    with ExitStack() as stack:
        replicas, identities = _start_replicas(args, stack) if args.replicas > 1 else ([], [])
        model, tokenizer, model_label, device_label = _model(args, identities)
        prompts = [prompt_ids(tokenizer, tokenizer.chat_template, r) for r in requests]
        oracle = oracle_hits(prompts)
        working_set = _working_set(requests, prompts, args.reply_tokens, args.concurrency)
        each = _capacities(args, prompts, working_set, max(1, len(replicas)))
        caps = each.times(args.replicas)  # one server's, or one replica's with all the replicas' memory
        sessions = len(by_session(requests))
        workload = f"{sessions}-sessions" + (f"-{len(replicas)}-replicas" if replicas else "")
        stem = Path(args.out) / (args.name or slug(f"load-{device_label}-{model_label}-{workload}"))
        json_path = stem.with_name(f"{stem.name}.json")
        shape = LoadShape(args.tool_time, args.reply_tokens, args.seed, args.concurrency or sessions)
        rows: dict[str, dict[str, Any]] = {}
        result: dict[str, Any] = {
            "device": device_label,
            "model": model_label,
            "workload": {
                "files": args.traces,
                "synthetic": args.synthetic,
                "context": args.context,
                "copies": args.copies,
                "sessions": sessions,
                "requests": len(requests),
                "concurrency": args.concurrency or sessions,
                "tool_time_s": args.tool_time,
                "reply_tokens": args.reply_tokens,
            },
            "working_set_tokens": working_set,
            "capacities": asdict(caps),
            "oversubscription": working_set / caps.pool_tokens,
            "rows": rows,
            "command": "warmkv bench load " + " ".join(sys.argv[3:]),
        }
        if args.url:
            endpoint = Endpoint(args.url, args.api_key)
            rows["url"] = measure_load(
                [endpoint], args.served_model or first_model(args), requests, oracle, shape, "url"
            )
            rows["url"] |= _scrape_scheduler(args.url)
            write_json(result, json_path)
        elif replicas:
            gpu_names = [identity.gpu_name for identity in identities]
            cluster = Cluster(replicas, gpu_names, model_label, _common_flags(args), args.redis_url)
            result["replicas"] = cluster.describe(each)
            names = args.policies.split(",") if args.policies else row_names(args.replicas)
            for name, row in cluster.rows(names, requests, oracle, shape, each, warm_up_turns(base)):
                rows[name] = row
                write_json(result, json_path)  # as each row comes: a run cut short keeps what it measured
            result["scaling"] = cluster.scaling(rows)
            write_json(result, json_path)
        else:
            for name, row in _policy_rows(args, model, caps, requests, oracle, shape, warm_up_turns(base)):
                rows[name] = row
                write_json(result, json_path)  # as each row comes: a run cut short keeps what it measured
            for name in peers:
                rows[name] = _run_peer(name, args, model, requests, shape, sessions, working_set)
                write_json(result, json_path)
    print(
        f"{sessions} sessions, {len(requests)} requests; working set {working_set} tokens on a "
        f"{caps.pool_tokens}-token pool ({result['oversubscription']:.1f}x oversubscribed)"
    )
    print("\n".join(table(rows)))
    if "scaling" in result:
        print("\n".join(f"{name}: {value:.3f}" for name, value in result["scaling"].items()))
    picture = plot(rows, stem)
    print("wrote", json_path, *([picture] if picture else ["(no plot: install matplotlib)"]))


def _model(args: argparse.Namespace, identities: list[ReplicaIdentity]) -> tuple[Any, Any, str, str]:
    """The model loaded here (None with replicas: the weights load in them, and the oracle needs the
    tokenizer alone), its tokenizer, its name and the device's."""
    if identities:
        first = identities[0]
        return None, load_tokenizer(Path(first.tokenizer_folder)), first.model_name, first.gpu_name
    tokenizer, _, model, device_label = model_and_tokenizer(args)
    return model, tokenizer, model.name, device_label


def _policy_rows(args: argparse.Namespace, model: Any, caps: Capacities, requests: list[TraceRequest],
                 oracle: list[int], shape: LoadShape,
                 warm_up: list[TraceRequest]) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    """The --policies, each on a fresh embedded server over the model loaded here; on a GPU the warm-up
    turns first (see warm_up_turns)."""
    for index, (name, policy) in enumerate(_load_policies(args, caps).items()):
        flags = [*policy.flags, "--kv-pool-tokens", str(caps.pool_tokens), "--device", args.device,
                 *_common_flags(args)]  # fmt: skip
        if index == 0 and model.device.type == "cuda":
            _run_embedded(model, flags, warm_up, [0] * len(warm_up), no_wait(shape), "warm-up")
        row = _run_embedded(model, flags, requests, oracle, shape, name)
        yield name, {"description": policy.description, "flags": flags} | row


def _common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
    return flags + (["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else [])


def _start_replicas(
    args: argparse.Namespace, stack: ExitStack
) -> tuple[list[ReplicaProcess], list[ReplicaIdentity]]:
    """A process per replica, each loading the model on its GPU; all load at once."""
    spec = ModelSpec(args.model, args.shape, args.tokenizer, args.dtype)
    replicas = []
    for gpu in replica_gpus(args.device, args.replicas):
        replicas.append(ReplicaProcess(spec, gpu))
        stack.callback(replicas[-1].close)
    identities = [
        r.wait_loaded() for r in tqdm(replicas, desc="loading the replicas", unit="replica", leave=False)
    ]
    return replicas, identities


def _check(args: argparse.Namespace) -> list[str]:
    """The flags checked before a model loads; the --peer names."""
    if args.concurrency < 0:
        raise WarmkvError(f"--concurrency must not be negative, got {args.concurrency}")
    for flag in ("copies", "reply_tokens", "max_num_seqs", "replicas"):
        if getattr(args, flag) < 1:
            raise WarmkvError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.tool_time < 0:
        raise WarmkvError(f"--tool-time must not be negative, got {args.tool_time}")
    if args.replicas > 1 and (args.url or args.peer):
        raise WarmkvError("--replicas runs warmkv's own replicas: not with --url or --peer")
    unknown = set((args.policies or "").split(",")) - {"", *row_names(args.replicas)}
    if args.replicas > 1 and unknown:
        known = ", ".join(row_names(args.replicas))
        raise WarmkvError(f"--policies with --replicas names rows: unknown {', '.join(sorted(unknown))}; "
                          f"choose from {known}")  # fmt: skip
    if args.redis_url and args.replicas == 1:
        raise WarmkvError("--redis-url is the shared tier of --replicas N (N > 1)")
    missing = [path for path in args.traces if not Path(path).is_file()]
    if missing:
        raise WarmkvError(f"trace not found: {', '.join(missing)}")
    return peer_names(args.peer, args.url, args.shape)


def _working_set(requests: list[TraceRequest], prompts: list[list[int]], reply_tokens: int,
                 concurrency: int) -> int:  # fmt: skip
    """KV of the sessions that can run at once (all, or the `concurrency` largest) at their longest, all
    held at once: what the pool would need to keep them all."""
    longest: dict[str, int] = {}
    for request, prompt in zip(requests, prompts, strict=True):
        longest[request.session] = max(longest.get(request.session, 0), len(prompt) + reply_tokens)
    return sum(sorted(longest.values(), reverse=True)[: concurrency or None])


def _capacities(
    args: argparse.Namespace, prompts: list[list[int]], working_set: int, servers: int
) -> Capacities:
    """Each server's share: a pool of a quarter of its share of the working set (4x oversubscribed), yet
    room for the longest request alone; a host tier that holds its share of the working set."""
    longest = max(len(p) for p in prompts) + args.reply_tokens
    pool = args.pool_tokens or -(-max(longest + BLOCK, working_set // 4 // servers) // BLOCK) * BLOCK
    host = args.host_tokens if args.host_tokens is not None else working_set // servers
    align = max(BLOCK, args.context // 8 // BLOCK * BLOCK)
    return Capacities(pool, host, align, 2 * align)


def _load_policies(args: argparse.Namespace, caps: Capacities) -> dict[str, Any]:
    known = policies(caps)
    names = args.policies.split(",") if args.policies else list(DEFAULT_LOAD_POLICIES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WarmkvError(f"--policies: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return {n: known[n] for n in names}


def _run_embedded(
    model: Any,
    flags: list[str],
    requests: list[TraceRequest],
    oracle: list[int],
    shape: LoadShape,
    label: str,
) -> dict[str, Any]:
    kv_dir = Path(tempfile.mkdtemp(prefix=f"warmkv-load-{label}-"))
    server = embedded_warmkv(model, flags, kv_dir)
    try:
        row = measure_load([Endpoint(f"{server.url}/v1")], model.name, requests, oracle, shape, label)
    finally:
        counters = stop_embedded(server)
        shutil.rmtree(kv_dir, ignore_errors=True)
    return row | counters


def _run_peer(name: str, args: argparse.Namespace, model: Any, requests: list[TraceRequest], shape: LoadShape,
              sessions: int, working_set: int) -> dict[str, Any]:  # fmt: skip
    """The peer's row: the same sessions through the same client, judged against an oracle of the peer's
    own prompt tokens (read before the run: tokenising touches no cache)."""
    options = _peer_options(name, min(sessions, args.max_num_seqs), working_set)
    free_gpu_for_peer()
    with make_peer(name, model.name, gguf_of(args.model), model.folder, **options) as peer:
        with peer.http() as http:
            oracle = peer_oracle(peer.tokenizer(http), requests)
        with tqdm(total=len(requests), desc=f"load {name}", unit="req", leave=False) as bar:
            run = run_load([Endpoint(peer.url, peer.api_key)], peer.model, requests, shape, bar.update)
        flags = peer.command()[1:]
    return {
        "description": f"{name} (real server) with its best prompt-caching flags",
        "flags": flags,
        "oracle_source": f"{name}'s own prompt tokens ({oracle.dialect})",
        "prompt_length_mismatches": oracle.mismatches(run.results),
    } | summarize_load(run, oracle.clipped(run.results))


def _peer_options(name: str, concurrent: int, working_set: int) -> dict[str, Any]:
    """llama-server runs a slot per concurrent session over one unified KV buffer as large as the working
    set: more than warmkv's pool, because it has no lower tier to preempt into (a full buffer fails every
    running request). vLLM sizes its own KV (VLLM_CPU_KVCACHE_SPACE) and preempts by recomputation."""
    if name != "llama.cpp":
        return {}
    return {"slots": concurrent, "context_tokens": -(-working_set // 256) * 256}


def _scrape_scheduler(url: str) -> dict[str, float | None]:
    """The server's preemption and swap counters, where it is a warmkv server (else None)."""
    try:
        text = httpx.get(re.sub(r"/v1/?$", "", url) + "/metrics", timeout=10).text
    except httpx.HTTPError:
        text = ""
    values = {}
    for name in SCHEDULER_METRICS:
        match = re.search(rf"^warmkv_{name}_total (\S+)$", text, re.MULTILINE)
        values[name] = float(match.group(1)) if match else None
    return values


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    head = (
        f"{'policy':22} {'reqs':>5} {'errors':>6} {'prompt':>9} {'cached':>9} {'oracle':>9} "
        f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'e2e p50':>8} {'p90':>8} {'req/s':>6} {'tok/s':>7} "
        f"{'preempt':>7} {'swapped':>9}"
    )
    lines = [head]
    for name, row in rows.items():
        times = [
            _ms(row[k]) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "latency_p50_s", "latency_p90_s")
        ]
        swapped = (row.get("swapped_out_bytes") or 0) + (row.get("swapped_in_bytes") or 0)
        preempt = "-" if row.get("preemptions") is None else f"{row['preemptions']:.0f}"
        lines.append(
            f"{name:22} {row['requests']:>5} {row['errors']:>6} {row['prompt_tokens']:>9} "
            f"{row['cached_tokens']:>9} {row['oracle_tokens']:>9} {times[0]:>9} {times[1]:>8} "
            f"{times[2]:>8} {times[3]:>8} {times[4]:>8} {row['requests_per_s']:>6.2f} "
            f"{row['generated_tokens_per_s']:>7.1f} {preempt:>7} {swapped / 1e6:>7.0f}MB"
        )
    return lines


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def plot(rows: dict[str, dict[str, Any]], stem: Path) -> Path | None:
    """TTFT distribution per policy (CDF) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, row in rows.items():
        ttfts = sorted(r["ttft_s"] for r in row["requests_detail"] if r["ttft_s"] is not None)
        if ttfts:
            ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
    ax.set_xscale("log")
    ax.set(
        xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT under concurrent load"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    path = stem.with_name(f"{stem.name}-ttft.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
