"""The Triton paged-attention kernel against plain softmax attention over the gathered context.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), so its
indexing, masking and split merging are checked on CPU CI too; on a GPU the same cases run compiled.
"""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from warmkv.kernels import paged_attention as kernel  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE = 16


def reference(q, k_cache, v_cache, tables, query_lens, context_lens, scale, window, sinks=None):
    out, row = torch.empty_like(q), 0
    for table, query_len, context_len in zip(tables, query_lens, context_lens, strict=True):
        positions = torch.arange(context_len)
        slots = torch.tensor(table)[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        k, v = k_cache[slots.to(q.device)].float(), v_cache[slots.to(q.device)].float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        query = q[row : row + query_len].float()
        scores = torch.einsum("qhd,khd->hqk", query, k) * scale
        query_pos = torch.arange(context_len - query_len, context_len)[:, None]
        visible = positions[None, :] <= query_pos
        if window:
            visible &= positions[None, :] > query_pos - window
        scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
        if sinks is not None:  # one more logit per head, whose value is zero
            scores = torch.cat((scores, sinks.float()[:, None, None].expand(-1, query_len, 1)), dim=-1)
        weights = scores.softmax(-1)[..., :context_len]
        out[row : row + query_len] = torch.einsum("hqk,khd->qhd", weights, v).to(q.dtype)
        row += query_len
    return out


def run_case(
    query_lens, context_lens, heads, kv_heads, head_dim, window=None, splits=None, seed=0, sinks=False,
    dtype=None,
):  # fmt: skip
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype = dtype or (torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    num_blocks = sum(-(-c // BLOCK_SIZE) for c in context_lens) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks scattered through the pool, as after eviction and reuse
    tables = [[free.pop() for _ in range(-(-c // BLOCK_SIZE))] for c in context_lens]
    k_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(query_lens), heads, head_dim, dtype=dtype, device=DEVICE)
    batch = kernel.plan(query_lens, context_lens, tables, BLOCK_SIZE, heads, kv_heads, DEVICE)
    if splits is not None:
        batch.num_splits = splits
    scale = head_dim**-0.5
    sink_logits = torch.randn(heads, device=DEVICE) * 2 if sinks else None
    got = kernel.paged_attention(q, k_cache, v_cache, batch, scale, window, sink_logits)
    want = reference(q, k_cache, v_cache, tables, query_lens, context_lens, scale, window, sink_logits)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("seqs", [1, 2, 3, 5])
def test_plan_inputs_start_16_byte_aligned_whatever_the_batch(seqs: int) -> None:
    """Triton compiles the kernel again for each new alignment of its pointers: a step's inputs must not
    change it (each compile stalls a serving step for about a second)."""
    tables = [[7] * (width + 1) for width in range(seqs)]  # table widths and counts of every residue
    batch = kernel.plan([3] * seqs, [10] * seqs, tables, BLOCK_SIZE, 4, 2, DEVICE)
    parts = (batch.block_table, batch.context_lens, batch.query_starts, batch.tile_seqs, batch.tile_starts)
    assert all(part.data_ptr() % 16 == 0 for part in parts)
    assert batch.query_starts.tolist() == [3 * i for i in range(seqs + 1)]
    assert batch.context_lens.tolist() == [10] * seqs and batch.block_table[-1].tolist() == [7] * seqs


def test_a_plan_is_read_from_the_device_it_was_made_for() -> None:
    """Every input the kernel reads comes from the one copy to the device. Parts left in host memory fail
    the launch on a GPU that cannot read pageable memory ("cannot be accessed from Triton"), and are read
    over the bus on one that can. The meta device tells them apart on a CPU."""
    batch = kernel.plan([3, 1], [10, 20], [[0, 1], [2]], BLOCK_SIZE, 4, 2, torch.device("meta"))
    parts = (batch.block_table, batch.context_lens, batch.query_starts, batch.tile_seqs, batch.tile_starts)
    assert [part.device.type for part in parts] == ["meta"] * 5
    assert [tuple(part.shape) for part in parts] == [(2, 2), (2,), (3,), (2,), (2,)]


def test_decode_batch_of_sequences_with_different_contexts() -> None:
    run_case([1, 1, 1], [5, 70, 33], heads=4, kv_heads=2, head_dim=16)


def test_decode_split_along_keys_merges_to_the_same_result() -> None:
    # 5 splits over 150 keys: some splits get one step of keys, the last an empty range
    run_case([1, 1], [150, 17], heads=6, kv_heads=2, head_dim=32, splits=5)
    # splits that are not a power of two, read in one trip of 64 (more than 64, a chunk at a time after the
    # first trip: test_splits_that_saw_no_key_add_nothing)
    run_case([1], [2600], heads=4, kv_heads=2, head_dim=16, splits=37)


def test_prefill_chunks_on_top_of_cached_blocks_and_fresh_prompts_together() -> None:
    # a chunk after 40 cached tokens, a fresh prompt longer than one tile, and a decode step
    run_case([23, 90, 1], [63, 90, 12], heads=4, kv_heads=1, head_dim=16)
    # a short turn after a long cached prefix: few tiles, so their keys are split too (SPLIT_PREFILL_LAUNCH)
    run_case([20, 5], [300, 60], heads=4, kv_heads=2, head_dim=16, splits=3)
    run_case([20, 1], [300, 80], heads=4, kv_heads=2, head_dim=16, splits=3, window=24, sinks=True)


def test_offsets_are_64_bit_from_a_cache_of_2_31_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offsets into a layer's K/V are 32-bit below 2**31 elements, where the largest still fits; the 64-bit
    branch, forced here at a small size, computes the same."""
    assert not kernel.needs_64_bit_offsets(torch.empty(2**31 - 1, dtype=torch.bfloat16, device="meta"))
    assert kernel.needs_64_bit_offsets(torch.empty(2**30, 2, dtype=torch.bfloat16, device="meta"))
    asked = []

    def forced(cache: torch.Tensor) -> bool:
        asked.append(cache.numel())
        return True

    monkeypatch.setattr(kernel, "needs_64_bit_offsets", forced)
    run_case([23, 1], [63, 40], heads=4, kv_heads=2, head_dim=16, splits=3)
    assert len(asked) == 1  # the launch decides by the rule above: here the 64-bit branch, forced


def test_group_that_is_not_a_power_of_two_is_padded() -> None:
    run_case([3, 1], [20, 9], heads=21, kv_heads=3, head_dim=16)  # 7 query heads per KV head


def test_splits_that_saw_no_key_add_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A split past a short context (a graph sized for the longest: most splits are empty) writes only its
    lse, and the merge uses no partial output of a split that saw no key: every buffer the kernels
    allocate starts as NaN, which would spread to the output through a single use of an unwritten one. The
    merge loads the first 64 splits with their lse and any after them a chunk at a time: 80 splits that
    all see keys cover both."""
    empty = torch.empty

    def nan_filled(*size, **kwargs):
        out = empty(*size, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(kernel.torch, "empty", nan_filled)
    # 40 splits over 150 keys (3 steps) and over 17 keys (1 step); with a window and sinks too
    run_case([1, 1], [150, 17], heads=4, kv_heads=2, head_dim=16, splits=40)
    run_case([20, 1], [300, 80], heads=4, kv_heads=2, head_dim=16, splits=24, window=24, sinks=True)
    run_case([1, 1], [80 * 64, 300], heads=4, kv_heads=2, head_dim=16, splits=80)


def test_attention_sinks_join_the_softmax_once_across_splits() -> None:
    run_case([1, 1], [150, 17], heads=4, kv_heads=2, head_dim=16, splits=3, sinks=True)
    run_case([30, 1], [100, 80], heads=4, kv_heads=2, head_dim=16, window=24, sinks=True)


def test_sliding_window_hides_keys_before_it() -> None:
    run_case([30, 1], [100, 80], heads=4, kv_heads=2, head_dim=16, window=24)
    run_case([1], [200], heads=4, kv_heads=2, head_dim=16, window=24, splits=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen_7b_shape_long_context_on_gpu() -> None:
    run_case([1, 1, 1, 1], [4000, 31, 900, 1], heads=28, kv_heads=4, head_dim=128)
    run_case([512, 7], [4608, 300], heads=28, kv_heads=4, head_dim=128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float32_short_turn_over_a_long_prefix_on_gpu() -> None:
    """A float32 model's short turn is split along the keys with a launch that fits in shared memory
    (the 16-bit models' split launch does not: Triton refused it with OutOfResources)."""
    run_case([64], [2112], heads=28, kv_heads=4, head_dim=128, dtype=torch.float32)


def test_a_turns_splits_fill_whole_waves_of_one_program_per_sm() -> None:
    """H100 (132 SMs), Qwen2.5-7B's 4 KV heads: 7 tiles take 4 splits (112 programs, one wave), 5 tiles 6
    (120); 19 tiles 3 (228 programs: two waves 86% full, where one split would fill one wave 58%)."""
    assert [kernel._whole_waves(tiles * 4, 132) for tiles in (7, 5, 19)] == [4, 6, 3]
    for sms in (1, 16, 108, 132):  # every turn that does not fill two waves on its own gets at least one
        for programs in range(1, 2 * sms):
            splits = kernel._whole_waves(programs, sms)
            assert splits >= 1 and programs * splits >= 0.75 * sms * -(-programs * splits // sms)
