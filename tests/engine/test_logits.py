"""What users' sampling parameters do to the tokens: penalties, logit bias, min-p, log-probs, grammars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers

from warmkv.engine.config import EngineConfig
from warmkv.engine.grammar import GrammarCompiler, json_schema_grammar
from warmkv.engine.llm_engine import LLMEngine
from warmkv.engine.sampling import SamplingParams
from warmkv.errors import InvalidRequest
from warmkv.models.loader import load_model

PROMPT = list(range(1000, 1050))
SCHEMA = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "detailed": {"type": "boolean"},
    },
    "required": ["unit", "days", "detailed"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_folder: Path):
    return load_model(str(tiny_llama_folder), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_model) -> LLMEngine:
    return LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096))


def generate(engine: LLMEngine, prompt: list[int] = PROMPT, **params) -> tuple[list[int], list]:
    outputs = list(engine.generate(prompt, SamplingParams(**params)))
    return outputs[-1].sequence.output_ids, outputs


def test_greedy_without_parameters_equals_transformers_greedy(engine, tiny_llama_folder: Path) -> None:
    # no processor touches the logits: the tokens are the model's argmax, as before any of this existed
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_folder, dtype=torch.float32)
    expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()  # fmt: skip
    ids, _ = generate(engine, max_tokens=12, ignore_eos=True)
    assert ids == expected
    neutral = engine.add_request(PROMPT, SamplingParams(repetition_penalty=1.0, logit_bias={}))
    assert neutral.logits_processors == []
    engine.abort(neutral)


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_one(engine) -> None:
    forced, _ = generate(engine, max_tokens=8, temperature=1.0, seed=1, logit_bias={4242: 100},
                         ignore_eos=True)  # fmt: skip
    assert forced == [4242] * 8
    greedy, _ = generate(engine, max_tokens=8, ignore_eos=True)
    banned, _ = generate(engine, max_tokens=8, logit_bias={greedy[0]: -100}, ignore_eos=True)
    assert banned[0] != greedy[0] and greedy[0] not in banned


def test_min_p_one_is_greedy_at_any_temperature(engine) -> None:
    greedy, _ = generate(engine, max_tokens=10, ignore_eos=True)
    for seed in range(3):
        sampled, _ = generate(engine, max_tokens=10, temperature=1.5, min_p=1.0, seed=seed, ignore_eos=True)
        assert sampled == greedy


def test_penalties_stop_repeats_the_unpenalised_output_has(engine) -> None:
    plain, _ = generate(engine, max_tokens=40, ignore_eos=True)
    assert len(set(plain)) < len(plain)  # the tiny model loops when left alone
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1e6}):
        penalised, _ = generate(engine, max_tokens=40, ignore_eos=True, **penalty)
        assert len(set(penalised)) > len(set(plain)), penalty
    # the repetition penalty covers the prompt too: with it huge, no prompt token comes back
    penalised, _ = generate(engine, max_tokens=40, ignore_eos=True, repetition_penalty=1e6)
    assert not set(penalised) & set(PROMPT) and len(set(penalised)) == len(penalised)


def test_logprobs_are_the_models_and_alternatives_come_sorted(engine) -> None:
    ids, outputs = generate(engine, max_tokens=6, ignore_eos=True, logprobs=5)
    for token, output in zip(ids, outputs, strict=True):
        lp = output.logprobs
        assert lp.token_id == token and len(lp.top) == 5
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert lp.top[0] == (token, lp.logprob)  # greedy picks the likeliest
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
    _, outputs = generate(engine, max_tokens=3, ignore_eos=True)
    assert all(o.logprobs is None for o in outputs)
    with pytest.raises(InvalidRequest, match="logprobs"):
        SamplingParams(logprobs=21)


def test_token_ids_outside_the_vocabulary_are_refused(engine) -> None:
    with pytest.raises(InvalidRequest, match=r"logit_bias: token ids must be in \[0, 49152\)"):
        engine.add_request(PROMPT, SamplingParams(logit_bias={49152: 1.0}))


def test_json_schema_grammar_yields_valid_json_at_temperature_one(engine) -> None:
    compiler = GrammarCompiler(engine.model.tokenizer, engine.eos_token_ids)
    grammar = compiler.compile(json_schema_grammar(SCHEMA))
    for seed in range(5):
        _, outputs = generate(engine, max_tokens=60, temperature=1.0, seed=seed, grammar=grammar)
        assert outputs[-1].sequence.finish_reason.value == "stop"
        jsonschema.validate(json.loads("".join(o.text for o in outputs)), SCHEMA)


def test_grammar_state_survives_preemption(tiny_model) -> None:
    # five constrained sequences in a pool of 20 blocks, prefilled in chunks side by side: they preempt each
    # other, and each one's grammar position travels with it, so the output is what it would be alone
    compiler = GrammarCompiler(tiny_model.tokenizer, {2})
    grammar = compiler.compile(json_schema_grammar(SCHEMA))
    prompts = [list(range(1000 * i, 1000 * i + 150)) for i in range(1, 6)]
    params = dict(max_tokens=60, temperature=1.0, grammar=grammar)
    roomy = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=4096, prefix_cache=False))  # leaves no KV
    alone = [generate(roomy, p, seed=i, **params)[0] for i, p in enumerate(prompts)]
    engine = LLMEngine(tiny_model, EngineConfig(kv_pool_tokens=320, block_size=16, max_batch_tokens=64))
    seqs = [engine.add_request(p, SamplingParams(seed=i, **params)) for i, p in enumerate(prompts)]
    while engine.has_work:
        engine.step()
    assert engine.stats.preemptions > 0
    assert [s.output_ids for s in seqs] == alone
    for seq in seqs:
        text = tiny_model.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_an_invalid_schema_is_refused_with_its_reason(tiny_model) -> None:
    compiler = GrammarCompiler(tiny_model.tokenizer, {2})
    with pytest.raises(InvalidRequest, match="cannot be enforced"):
        compiler.compile(json_schema_grammar({"type": "no-such-type"}))


def test_extreme_repetition_penalty_still_samples(engine) -> None:
    # found by the fuzzer: 5e-324 turned positive logits into +inf and the sampler's probabilities into NaN
    for temperature in (0.0, 1.0):
        ids, _ = generate(engine, max_tokens=4, ignore_eos=True, repetition_penalty=5e-324,
                          temperature=temperature, seed=1)  # fmt: skip
        assert len(ids) == 4
