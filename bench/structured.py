"""What enforcing a JSON schema costs: decode time per token with and without the grammar's mask, one run.

    python -m bench.structured                                  # the default model on this machine
    python -m bench.structured --shape qwen2.5-7b --tokenizer DIR --device cuda --batches 1 8 32 --tokens 256

For each batch size, BATCH sequences decode greedily together after the same prompt, once free and once
under a json_schema grammar (a long list of objects, so the grammar stays open). Reported: decode
milliseconds per step of each, the overhead of the constrained run as a fraction of the free one, and the
mask alone (computing the allowed tokens and advancing the matcher, replayed over the constrained run's
tokens) per step as a fraction of a free step. The mask is computed on the CPU, sequence by sequence.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, add_model_flags, device_name, print_table, synchronize, write_result
from warmkv.engine.config import EngineConfig
from warmkv.engine.grammar import Grammar, GrammarCompiler, json_schema_grammar
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.models.random_init import model_or_shape

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "unit": {"enum": ["g", "kg", "ml", "l", "piece"]},
                    "organic": {"type": "boolean"},
                },
                "required": ["name", "quantity", "unit", "organic"],
            },
        }
    },
    "required": ["items"],
}
ASK = "List two hundred grocery items with their quantity, unit and whether they are organic, as JSON."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=48, help="tokens decoded per sequence")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = parser.parse_args()

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, prefix_cache=False,
                          max_num_seqs=max(args.batches))  # fmt: skip
    device = config.torch_device()
    model = model_or_shape(args.model, args.shape, args.tokenizer, device, config.torch_dtype(device))
    config.kv_pool_tokens = max(args.batches) * (256 + args.tokens + 16)
    engine = LLMEngine(model, config)
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": ASK}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    compiler = GrammarCompiler(model.tokenizer, engine.eos_token_ids)
    started = time.perf_counter()
    grammar = compiler.compile(json_schema_grammar(SCHEMA))
    compile_s = time.perf_counter() - started  # the tokenizer's index included: once per server
    _decode(engine, list(prompt), 1, 4, None)  # warm-up
    rows = [_row(engine, list(prompt), batch, args.tokens, grammar) for batch in args.batches]
    print_table(rows)
    result = {
        "device": device_name(device),
        "model": model.name,
        "tokens": args.tokens,
        "first_compile_s": compile_s,
        "rows": rows,
        "command": "python -m bench.structured " + " ".join(sys.argv[1:]),
    }
    name = f"structured-{device_name(device).lower().replace(' ', '-')}-{model.name.lower()}"
    print("wrote", write_result(name, result, args.out))


def _row(engine: LLMEngine, prompt: list[int], batch: int, tokens: int, grammar: Grammar) -> dict:
    free_s, free_steps, _ = _decode(engine, prompt, batch, tokens, None)
    constrained_s, constrained_steps, outputs = _decode(engine, prompt, batch, tokens, grammar)
    mask_s = _replay_mask(grammar, outputs, engine.model.config.vocab_size, engine.model.device)
    free_ms = free_s / free_steps * 1000
    constrained_ms = constrained_s / constrained_steps * 1000
    mask_ms = mask_s / constrained_steps * 1000
    return {
        "batch": batch,
        "steps": constrained_steps,
        "free ms/step": free_ms,
        "constrained ms/step": constrained_ms,
        "overhead %": (constrained_ms / free_ms - 1) * 100,
        "mask ms/step": mask_ms,
        "mask % of free step": mask_ms / free_ms * 100,
    }


def _decode(
    engine: LLMEngine, prompt: list[int], batch: int, tokens: int, grammar: Grammar | None
) -> tuple[float, int, list[list[int]]]:
    """Seconds and steps of decoding (prefill excluded), and each sequence's tokens."""
    seqs = [engine.add_request(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True, grammar=grammar))
            for _ in range(batch)]  # fmt: skip
    while any(not s.output_ids for s in seqs):  # prefill, and the first token of each
        engine.step()
    device = engine.model.device
    synchronize(device)
    started, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()
        steps += 1
    synchronize(device)
    return time.perf_counter() - started, steps, [s.output_ids for s in seqs]


def _replay_mask(grammar: Grammar, outputs: list[list[int]], vocab_size: int, device: torch.device) -> float:
    """Seconds the grammar's own work takes over these outputs: each token's mask, then the advance."""
    matchers = [grammar.matcher() for _ in outputs]
    for matcher, output in zip(matchers, outputs, strict=True):
        matcher.advance(output[0])  # the first token came with the prefill, outside the decode timing
    synchronize(device)
    started = time.perf_counter()
    for step in range(1, max(map(len, outputs))):
        for matcher, output in zip(matchers, outputs, strict=True):
            if step < len(output):
                matcher.allowed(vocab_size, device)
                matcher.advance(output[step])
    synchronize(device)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
