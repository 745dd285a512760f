"""A stored block is trusted in nothing: any damaged byte, header or payload, and any block not of the
model's KV layout is refused with CacheCorruption (never another error, never a wrong tensor)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmkv.cache.tiers.codec import HEADER_SIZE, BlockLayout, decode_block, encode_block, stored_identity
from warmkv.errors import CacheCorruption

FINGERPRINT, KEY = "ab" * 16, b"k" * 16
LAYOUT = BlockLayout((2, 2, 4, 1, 8), torch.float16)
KV = torch.arange(128, dtype=torch.float16).reshape(LAYOUT.shape)


def test_a_block_decodes_to_what_was_stored() -> None:
    block = decode_block(bytearray(encode_block(FINGERPRINT, KEY, KV)), FINGERPRINT, KEY, LAYOUT)
    assert block.key == KEY and torch.equal(block.kv, KV)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_is_refused(data: st.DataObject) -> None:
    stored = bytearray(encode_block(FINGERPRINT, KEY, KV))
    position = data.draw(st.integers(0, len(stored) - 1), label="byte")
    stored[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(CacheCorruption):
        decode_block(stored, FINGERPRINT, KEY, LAYOUT)


@pytest.mark.parametrize(
    "forged",
    [
        KV.reshape(4, 2, 2, 1, 8),
        KV.reshape(2, 2, 4, 8),
        KV.float()[..., :4].contiguous(),
        KV.view(torch.bfloat16),
    ],
    ids=["other-shape-same-size", "other-rank", "other-dtype", "same-bytes-other-dtype"],
)
def test_a_well_formed_block_of_another_layout_is_refused(forged: torch.Tensor) -> None:
    # a writer with the right fingerprint and a valid checksum (a bug, or a hand-made file) is not trusted
    stored = bytearray(encode_block(FINGERPRINT, KEY, forged))
    with pytest.raises(CacheCorruption, match="the model's blocks are"):
        decode_block(stored, FINGERPRINT, KEY, LAYOUT)


def test_identity_is_readable_from_the_header_alone() -> None:
    head = encode_block(FINGERPRINT, KEY, KV)[:HEADER_SIZE]
    assert stored_identity(head) == (FINGERPRINT, KEY)
    assert stored_identity(b"PK\x03\x04" + head[4:]) is None  # a zip file, say
    assert stored_identity(head[:-1]) is None
