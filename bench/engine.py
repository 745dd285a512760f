"""Prefill and decode tokens/s of warmkv's runner against transformers, same model, same inputs, one run.

    python -m bench.engine                                    # the default model on this machine
    python -m bench.engine --shape qwen2.5-7b --device cuda   # random weights in Qwen2.5-7B's shape, bf16
    python -m bench.engine --shape qwen3-30b-a3b --device cuda --batches 8 32 --no-transformers  # MoE

Prefill: one prompt of --prompt-tokens, logits of the last token only, both sides keeping the KV.
Prefill over a cached prefix (--chunk-over-cached CHUNK CACHED): CHUNK new tokens attending to CACHED
tokens already in the pool, as a later turn of a conversation or a chunk of a long prompt (warmkv only).
Stalls (--stall STREAMS PROMPT CHUNK): STREAMS sequences decode while a PROMPT-token request arrives; the
longest gap between two of their tokens, with the prompt prefilled in CHUNK-token steps and in one step.
Decode: --decode-tokens greedy tokens after a short prompt; transformers runs its own KV cache loop.
"warmkv tok/s" counts the whole request (as transformers' column); "after first tok/s", which the
bandwidth limit is set against, the tokens after the prompts' prefill step, as a per-token limit counts.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench.common import (
    add_model_flags,
    copy_bandwidth,
    device_name,
    matmul_rate,
    median_seconds,
    print_table,
    synchronize,
    write_result,
)
from warmkv.engine.config import EngineConfig
from warmkv.engine.forward_item import ForwardItem
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import LoadedModel, load_model
from warmkv.models.random_init import random_mxfp4_model, random_pair


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(parser)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="warmkv decodes by sampling at this temperature, top-p 0.95, each request "
                        "seeded (0: greedy; transformers' loop stays greedy)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="*", default=[], help="decode batch sizes to measure")
    parser.add_argument("--chunk-over-cached", type=int, nargs=2, metavar=("CHUNK", "CACHED"))
    parser.add_argument("--stall", type=int, nargs=3, metavar=("STREAMS", "PROMPT", "CHUNK"))
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--mxfp4", action="store_true",
                        help="with a gpt-oss --shape: random MXFP4 experts as the published checkpoints hold "
                        "them (kept MXFP4 on CUDA); no transformers comparison")  # fmt: skip
    parser.add_argument("--decode-steps", type=int, help="greedy decode steps back to back (default: engine)")
    args = parser.parse_args()

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, prefix_cache=False,
                          decode_steps=args.decode_steps)  # fmt: skip
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    # the limits first, while the device's memory is free: the models and the pool take most of it
    rates = copy_bandwidth(device), matmul_rate(device, dtype)
    ours, theirs, name = _models(args, device, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in ours.module.parameters()) / 2**30
    batch_tokens = max(args.batches, default=1) * (32 + args.decode_tokens + 16)
    if args.stall:
        batch_tokens = max(batch_tokens, args.stall[0] * 1200 + args.stall[1])
    chunk_tokens = sum(args.chunk_over_cached or ())
    # the cached prefix stays in the pool for the rest of the run
    config.kv_pool_tokens = max(*args.prompt_tokens, batch_tokens) + chunk_tokens + args.decode_tokens + 64
    config.max_batch_tokens = max(args.prompt_tokens)
    engine = LLMEngine(ours, config)

    result: dict = {"device": device_name(device), "model": name, "dtype": str(dtype).removeprefix("torch."),
                    "weights_gib": weights_gib}  # fmt: skip

    def theirs_s(run: Callable[[], object]) -> float | None:
        return None if theirs is None else median_seconds(run, device, args.repeats)

    def row(phase: str, tokens: int, ours_s: float, their_s: float | None) -> dict:
        return {"phase": phase, "warmkv tok/s": tokens / ours_s,
                "transformers tok/s": tokens / their_s if their_s else None,
                "ratio": their_s / ours_s if their_s else None, "after first tok/s": None}  # fmt: skip

    rows = []
    for prompt_tokens in tqdm(args.prompt_tokens, desc="prefill lengths"):
        prompt = torch.randint(0, 32000, (prompt_tokens,)).tolist()
        ours_s = median_seconds(lambda p=prompt: _our_prefill(engine, p), device, args.repeats)
        rows.append(row(f"prefill {prompt_tokens}", prompt_tokens, ours_s,
                        theirs_s(lambda p=prompt: _their_prefill(theirs, p, device))))  # fmt: skip
    if args.chunk_over_cached:
        chunk, cached = args.chunk_over_cached
        ours_s = median_seconds(_chunk_over_cached(engine, chunk, cached), device, args.repeats)
        rows.append(row(f"prefill {chunk} over {cached} cached", chunk, ours_s, None))
    prompt = torch.randint(0, 32000, (32,)).tolist()
    ours_s, after_s = _our_decode(engine, 1, args, device, prompt)
    rows.append(row(f"decode {args.decode_tokens}", args.decode_tokens, ours_s,
                    theirs_s(lambda: _their_decode(theirs, prompt, args.decode_tokens, device)))
                | _after_first(1, args.decode_tokens, after_s))  # fmt: skip
    for batch in args.batches:
        ours_s, after_s = _our_decode(engine, batch, args, device)
        rows.append(row(f"decode batch {batch}", batch * args.decode_tokens, ours_s, None)
                    | _after_first(batch, args.decode_tokens, after_s))  # fmt: skip
    print_table(rows)
    if args.stall:
        streams, prompt_tokens, chunk = args.stall
        result["stall"] = [_stall(engine, streams, prompt_tokens, step) for step in (chunk, prompt_tokens)]
        print_table(result["stall"])
    result |= _limits(ours, engine, rows, args, rates, dtype)
    measured = [{"measure": k, "value": v} for k, v in result.items() if isinstance(v, float)]
    print_table(measured)
    decode = next(r for r in rows if r["phase"] == f"decode {args.decode_tokens}")
    result |= {
        "prefill_tokens": args.prompt_tokens[0],
        "prefill_tok_s": rows[0]["warmkv tok/s"],
        "transformers_prefill_tok_s": rows[0]["transformers tok/s"],
        "decode_tokens": args.decode_tokens,
        "decode_tok_s": decode["warmkv tok/s"],
        "transformers_decode_tok_s": decode["transformers tok/s"],
        "rows": rows,
        "command": "python -m bench.engine " + " ".join(_argv()),
    }
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{result['device']}-{name}".lower()).strip("-")
    print("wrote", write_result(f"engine-{slug}", result))


def _models(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[LoadedModel, object, str]:
    from transformers import AutoModelForCausalLM

    if args.shape and args.mxfp4:
        ours, theirs = random_mxfp4_model(args.shape, args.tokenizer, device, dtype), None
    elif args.mxfp4:
        raise SystemExit("--mxfp4 needs a gpt-oss --shape")
    elif args.shape:
        ours, theirs = random_pair(args.shape, args.tokenizer, device, dtype)
    elif args.no_transformers:
        ours, theirs = load_model(args.model, device, dtype), None
    else:
        ours = load_model(args.model, device, dtype)
        theirs = AutoModelForCausalLM.from_pretrained(str(ours.folder), dtype=dtype).to(device)
    # transformers' copy is let go when not compared: gpt-oss-20b's converted experts and transformers'
    # own do not fit an 80 GB GPU together with the pool and a prefill's activations
    return ours, None if args.no_transformers or theirs is None else theirs.eval(), ours.name


def _limits(model: LoadedModel, engine: LLMEngine, rows: list[dict], args: argparse.Namespace,
            rates: tuple[float, float], dtype: torch.dtype) -> dict:  # fmt: skip
    """Each result beside the limit measured in this run (`rates`): HBM copy bandwidth for decode, the bf16
    matmul rate for prefill (on a CPU, with smaller probes). A mixture-of-experts step reads only the
    experts its tokens chose."""
    bandwidth, matmul = rates
    cfg = model.config
    weights = _weight_bytes(model)
    context = 32 + args.decode_tokens // 2
    kv_bytes = context * engine.pool.block_bytes // engine.pool.block_size
    dtype_name = str(dtype).removeprefix("torch.")
    out = {"hbm_copy_bytes_per_s": bandwidth, f"{dtype_name}_matmul_flop_per_s": matmul,
           "weight_bytes_read_per_bs1_step": weights.read_per_step(1)}  # fmt: skip
    for row in rows:
        if row["phase"].startswith("decode "):
            batch = int(row["phase"].split()[-1]) if "batch" in row["phase"] else 1
            limit = batch * bandwidth / (weights.read_per_step(batch) + batch * kv_bytes)
            key = f"decode_batch{batch}" if "batch" in row["phase"] else "decode_bs1"
            out[f"{key}_tok_s"] = row["after first tok/s"]
            out[f"{key}_end_to_end_tok_s"] = row["warmkv tok/s"]
            out[f"{key}_bandwidth_limit_tok_s"] = limit
            out[f"{key}_fraction_of_bandwidth_limit"] = row["after first tok/s"] / limit
    linear_params = weights.active_values_per_prefill_token
    for row in rows:
        if row["phase"].startswith("prefill "):
            words = row["phase"].split()
            n, cached = int(words[1]), int(words[3]) if "cached" in words else 0
            # QK^T and PV over the cached keys and, causally, half the new ones
            attention = cfg.attention_flops_per_key * n * (cached + n / 2)
            flops = 2 * linear_params * n + attention
            name = f"prefill_{n // 1024}k" + (f"_over_{cached // 1024}k_cached" if cached else "")
            out[f"{name}_fraction_of_matmul_rate"] = flops * row["warmkv tok/s"] / n / matmul
    return out


@dataclass(slots=True)
class _WeightBytes:
    dense: int  # read by every step: attention, norms, dense MLPs (not the embedding: gathered, not read)
    lm_head: int
    experts: int  # all routed experts of all layers
    num_experts: int
    top_k: int
    dense_values: int  # the weights' values (MXFP4's two a byte, its scales none), for the FLOPs of prefill
    expert_values: int

    def read_per_step(self, batch: int) -> float:
        """Weight bytes a decode step of `batch` tokens reads: with routing spread evenly over the experts,
        a given expert is chosen by none of them with probability (1 - k/E)^batch."""
        chosen = 1 - (1 - self.top_k / self.num_experts) ** batch if self.experts else 0
        return self.dense + self.lm_head + chosen * self.experts

    @property
    def active_values_per_prefill_token(self) -> float:
        """Weight values a prompt token multiplies with (logits are of the last token only)."""
        share = self.top_k / self.num_experts if self.experts else 0
        return self.dense_values + share * self.expert_values


def _weight_bytes(model: LoadedModel) -> _WeightBytes:
    total = expert_bytes = values = expert_values = 0
    for name, param in model.module.named_parameters():  # a tied lm_head is listed once
        in_experts = ".mlp.experts." in name
        total += param.numel() * param.element_size()
        expert_bytes += param.numel() * param.element_size() if in_experts else 0
        # MXFP4 experts: bytes of two values each, and scales that are no values of their own
        count = 0 if name.endswith("_scales") else param.numel() * (2 if param.dtype == torch.uint8 else 1)
        values += count
        expert_values += count if in_experts else 0
    lm_head = model.module.lm_head.weight
    lm_head_bytes = lm_head.numel() * lm_head.element_size()
    embedding = 0 if model.config.tie_word_embeddings else lm_head_bytes
    tables = (1 if model.config.tie_word_embeddings else 2) * lm_head.numel()  # not multiplied in prefill
    moe = model.config.moe
    return _WeightBytes(total - expert_bytes - lm_head_bytes - embedding, lm_head_bytes, expert_bytes,
                        moe.num_experts if moe else 1, moe.top_k if moe else 1,
                        values - expert_values - tables, expert_values)  # fmt: skip


def _our_decode(engine: LLMEngine, batch: int, args: argparse.Namespace, device: torch.device,
                prompt: list[int] | None = None) -> tuple[float, float]:  # fmt: skip
    """Medians of (seconds to the last token, seconds from every sequence's first token to it) over runs of
    `batch` requests of --decode-tokens tokens each (greedy, or sampled at --temperature) after a 32-token
    prompt (`prompt`, or random ones), after one warm-up."""
    sampled = dict(temperature=args.temperature, top_p=0.95) if args.temperature else {}
    firsts, totals = [], []
    for _ in range(args.repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        seqs = [engine.add_request(prompt or torch.randint(0, 32000, (32,)).tolist(), SamplingParams(
                    max_tokens=args.decode_tokens, ignore_eos=True, seed=i if sampled else None, **sampled))
                for i in range(batch)]  # fmt: skip
        while not all(seq.output_ids for seq in seqs):  # the prompts' prefill
            engine.step()
        firsts.append(time.perf_counter() - start)
        while engine.has_work:
            engine.step()
        synchronize(device)
        totals.append(time.perf_counter() - start)
    afters = [total - first for first, total in zip(firsts[1:], totals[1:], strict=True)]
    return statistics.median(totals[1:]), statistics.median(afters)


def _after_first(batch: int, tokens: int, after_s: float) -> dict:
    """Decode speed past the prompts' prefill step, which the per-token limit does not count: the step of
    a 32-token prompt reads most of a mixture of experts' weights (Qwen3-30B-A3B: 87%)."""
    return {"after first tok/s": batch * (tokens - 1) / after_s}


def _stall(engine: LLMEngine, streams: int, prompt_tokens: int, prefill_step: int) -> dict:
    """Token gaps of running streams around the arrival of a long prompt, prefilled `prefill_step` tokens
    per step."""
    engine.config.max_batch_tokens = prefill_step
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    running = [engine.add_request(torch.randint(0, 32000, (32,)).tolist(), params) for _ in range(streams)]
    for _ in range(20):  # streams decoding, graphs captured
        engine.step()
    arrival = time.perf_counter()
    prompt_ids = torch.randint(0, 32000, (prompt_tokens,)).tolist()
    prompt = engine.add_request(prompt_ids, SamplingParams(max_tokens=1))
    gaps, last = [], arrival
    while prompt.finish_reason is None:
        engine.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    for seq in running:
        engine.abort(seq)
    return {"prefill tokens per step": prefill_step, "steps": len(gaps), "longest stream gap ms":
            1000 * max(gaps), "prompt done after ms": 1000 * (last - arrival)}  # fmt: skip


def _chunk_over_cached(engine: LLMEngine, chunk: int, cached: int) -> Callable[[], None]:
    """A timed step that prefills `chunk` tokens over `cached` tokens computed once beforehand."""
    tokens = torch.randint(0, 32000, (cached + chunk,)).tolist()
    blocks = engine.pool.allocate(-(-len(tokens) // engine.pool.block_size))
    engine.runner.forward([ForwardItem(tokens[:cached], 0, blocks)])
    return lambda: engine.runner.forward([ForwardItem(tokens[cached:], cached, blocks)])


def _our_prefill(engine: LLMEngine, prompt: list[int]) -> None:
    blocks = engine.pool.allocate(-(-len(prompt) // engine.pool.block_size))
    engine.runner.forward([ForwardItem(prompt, 0, blocks)])
    for block in blocks:
        engine.pool.decref(block)


@torch.inference_mode()
def _their_prefill(model: object, prompt: list[int], device: torch.device) -> None:
    model(torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)  # type: ignore[operator]


@torch.inference_mode()
def _their_decode(model: object, prompt: list[int], tokens: int, device: torch.device) -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt], device=device)
    for _ in range(tokens):
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # type: ignore[operator]
        ids = logits[:, -1:].argmax(-1)
    synchronize(device)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
