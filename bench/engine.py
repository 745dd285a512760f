"""Prefill and decode tokens/s of warmkv's runner against transformers, same model, same inputs, one run.

    python -m bench.engine                                    # the default model on this machine
    python -m bench.engine --shape qwen2.5-7b --device cuda   # random weights in Qwen2.5-7B's shape, bf16

Prefill: one prompt of --prompt-tokens, logits of the last token only, both sides keeping the KV.
Decode: --decode-tokens greedy tokens after a short prompt; transformers runs its own KV cache loop.
"""

from __future__ import annotations

import argparse
import re

import torch
from tqdm import tqdm

from bench.common import device_name, median_seconds, print_table, synchronize, write_result
from warmkv.engine.config import EngineConfig
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.model_runner import ForwardItem
from warmkv.engine.sampling import SamplingParams
from warmkv.models.loader import LoadedModel, load_model
from warmkv.models.random_init import SHAPES, random_pair


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder or .gguf (default: the default model)")
    parser.add_argument("--shape", choices=SHAPES, help="random weights in this model's shape instead")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape (used only to detokenise)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, prefix_cache=False)
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    ours, theirs, name = _models(args, device, dtype)
    config.kv_pool_tokens = max(args.prompt_tokens) + args.decode_tokens + 64
    config.max_batch_tokens = max(args.prompt_tokens)
    engine = LLMEngine(ours, config)

    result: dict = {"device": device_name(device), "model": name, "dtype": str(dtype).removeprefix("torch.")}
    rows = []
    for prompt_tokens in tqdm(args.prompt_tokens, desc="prefill lengths"):
        prompt = torch.randint(0, 32000, (prompt_tokens,)).tolist()
        ours_s = median_seconds(lambda p=prompt: _our_prefill(engine, p), device, args.repeats)
        theirs_s = median_seconds(lambda p=prompt: _their_prefill(theirs, p, device), device, args.repeats)
        rows.append({"phase": f"prefill {prompt_tokens}", "warmkv tok/s": prompt_tokens / ours_s,
                     "transformers tok/s": prompt_tokens / theirs_s, "ratio": theirs_s / ours_s})  # fmt: skip
    prompt = torch.randint(0, 32000, (32,)).tolist()
    ours_decode = args.decode_tokens / median_seconds(
        lambda: _our_decode(engine, prompt, args.decode_tokens), device, args.repeats
    )
    theirs_decode = args.decode_tokens / median_seconds(
        lambda: _their_decode(theirs, prompt, args.decode_tokens, device), device, args.repeats
    )
    rows.append({"phase": f"decode {args.decode_tokens}", "warmkv tok/s": ours_decode,
                 "transformers tok/s": theirs_decode, "ratio": ours_decode / theirs_decode})  # fmt: skip
    print_table(rows)
    result |= {
        "prefill_tokens": args.prompt_tokens[0],
        "prefill_tok_s": rows[0]["warmkv tok/s"],
        "transformers_prefill_tok_s": rows[0]["transformers tok/s"],
        "decode_tokens": args.decode_tokens,
        "decode_tok_s": ours_decode,
        "transformers_decode_tok_s": theirs_decode,
        "rows": rows,
        "command": "python -m bench.engine " + " ".join(_argv()),
    }
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{result['device']}-{name}".lower()).strip("-")
    print("wrote", write_result(f"engine-{slug}", result))


def _models(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[LoadedModel, object, str]:
    from transformers import AutoModelForCausalLM

    if args.shape:
        ours, theirs = random_pair(args.shape, args.tokenizer, device, dtype)
        return ours, theirs, ours.name
    ours = load_model(args.model, device, dtype)
    theirs = AutoModelForCausalLM.from_pretrained(str(ours.folder), dtype=dtype).to(device).eval()
    return ours, theirs, ours.name


def _our_prefill(engine: LLMEngine, prompt: list[int]) -> None:
    blocks = engine.pool.allocate(-(-len(prompt) // engine.pool.block_size))
    engine.runner.forward([ForwardItem(prompt, 0, blocks)])
    for block in blocks:
        engine.pool.decref(block)


@torch.inference_mode()
def _their_prefill(model: object, prompt: list[int], device: torch.device) -> None:
    model(torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)  # type: ignore[operator]


def _our_decode(engine: LLMEngine, prompt: list[int], tokens: int) -> None:
    outputs = engine.generate(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    for _ in outputs:
        pass


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
