"""A model's own sampling defaults, read from its `generation_config.json` the way transformers reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# transformers' defaults for a sampling model whose file leaves a field out
_HF_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


@dataclass(slots=True, frozen=True)
class GenerationDefaults:
    temperature: float = 0.0  # 0 is greedy: what a model without the file (or do_sample false) gets
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0  # 1: none
    source: str = "greedy: the model gives no generation_config.json"


def generation_defaults(folder: Path) -> GenerationDefaults:
    path = folder / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return GenerationDefaults()
    except (OSError, json.JSONDecodeError) as err:
        return GenerationDefaults(source=f"greedy: {path} is unreadable ({err})")
    if not isinstance(raw, dict):
        return GenerationDefaults(source=f"greedy: {path} is not a JSON object")
    penalty = _number(raw, "repetition_penalty", 1.0)
    if not raw.get("do_sample"):
        return GenerationDefaults(repetition_penalty=penalty, source=f"greedy: {path.name} (do_sample false)")
    return GenerationDefaults(
        temperature=_number(raw, "temperature", _HF_SAMPLING["temperature"]),
        top_p=_number(raw, "top_p", _HF_SAMPLING["top_p"]),
        top_k=int(_number(raw, "top_k", _HF_SAMPLING["top_k"])),
        repetition_penalty=penalty,
        source=path.name,
    )


def _number(raw: dict, key: str, default: float) -> float:
    value = raw.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
