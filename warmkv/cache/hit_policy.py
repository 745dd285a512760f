"""Other caches' reuse rules, emulated on warmkv's engine so that `warmkv bench replay` compares rules, not
engines. Benchmarks only: the serving path builds none of this (a lookup there serves any cached prefix,
`--hit-policy blocks`); an emulation is built and handed to the prefix cache only when the benchmark or the
explicit `--hit-policy` flag asks for one.

- checkpoints (ds4-style): a cold anchor at the first prompt's length aligned down, written once and never
  refreshed, plus interval checkpoints every N tokens of the most recent prompts; a hit stops at the
  longest checkpoint it reaches.
- units (DeepSeek-API-style): each prompt is stored in whole units of 64 tokens; a hit is the prefix shared
  with an earlier prompt, cut down to whole units. Generated tokens are never served.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class HitPolicyName(str, enum.Enum):
    BLOCKS = "blocks"
    CHECKPOINTS = "checkpoints"
    UNITS = "units"


@dataclass(slots=True)
class HitPolicyConfig:
    name: HitPolicyName  # CHECKPOINTS or UNITS: BLOCKS is warmkv's own rule, which needs no emulation
    checkpoint_align: int = 1024  # tokens; the cold anchor's alignment
    checkpoint_interval: int = 2048  # tokens between interval checkpoints
    checkpoint_slots: int = 64  # interval checkpoints kept (least recently used dropped)
    unit: int = 64  # tokens per cache unit


class HitEmulation:
    """Serves up to the longest recorded key; records keys at multiples of a stride (units: 64 tokens)."""

    def __init__(self, stride_blocks: int, slots: int | None) -> None:
        self.stride, self.slots = max(1, stride_blocks), slots
        self.points: OrderedDict[bytes, None] = OrderedDict()

    def usable(self, keys: list[bytes]) -> int:
        """How many leading keys of a prompt may be served."""
        return next((n for n in range(len(keys), 0, -1) if keys[n - 1] in self.points), 0)

    def record(self, prompt_keys: list[bytes]) -> None:
        """A prompt was computed; `prompt_keys` are its full blocks' keys."""
        for n in range(self.stride, len(prompt_keys) + 1, self.stride):
            self.points[prompt_keys[n - 1]] = None
            self.points.move_to_end(prompt_keys[n - 1])
        while self.slots is not None and len(self.points) > self.slots:
            self.points.popitem(last=False)


class CheckpointEmulation(HitEmulation):
    def __init__(self, align_blocks: int, interval_blocks: int, slots: int) -> None:
        super().__init__(interval_blocks, slots)
        self.align = max(1, align_blocks)
        self.anchor: bytes | None = None

    def usable(self, keys: list[bytes]) -> int:
        anchored = next((n for n, key in enumerate(keys, 1) if key == self.anchor), 0)
        return max(anchored, super().usable(keys))

    def record(self, prompt_keys: list[bytes]) -> None:
        aligned = len(prompt_keys) // self.align * self.align
        if self.anchor is None and aligned:  # written once: a stale anchor is never replaced
            self.anchor = prompt_keys[aligned - 1]
        super().record(prompt_keys)


def build_emulation(config: HitPolicyConfig | None, block_size: int) -> HitEmulation | None:
    """None (nothing to emulate) for warmkv's own rule."""
    if config is None or config.name is HitPolicyName.BLOCKS:
        return None
    if config.name is HitPolicyName.CHECKPOINTS:
        align, interval = config.checkpoint_align // block_size, config.checkpoint_interval // block_size
        return CheckpointEmulation(align, interval, config.checkpoint_slots)
    return HitEmulation(config.unit // block_size, None)
