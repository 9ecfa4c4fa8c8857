"""Byte-level alphabet tables."""

from __future__ import annotations

import numpy as np

from evo2_cli.data.alphabet import (
    COMPLEMENT,
    DNA_TO_RNA,
    EOD_ID,
    IUPAC_BYTES,
    RNA_TO_DNA,
    UPPERCASE,
    reverse_complement,
)


def as_tokens(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)


def test_reverse_complement_keeps_case_and_is_an_involution():
    assert reverse_complement(as_tokens(b"AACgtN")).tobytes() == b"NacGTT"
    assert reverse_complement(as_tokens(b"RYKMBVDHSW")).tobytes() == b"WSDHBVKMRY"
    every = as_tokens(IUPAC_BYTES.replace(b"U", b"").replace(b"u", b""))
    assert np.array_equal(reverse_complement(reverse_complement(every)), every)
    assert COMPLEMENT[EOD_ID] == EOD_ID and COMPLEMENT[ord("U")] == ord("A")


def test_tables_work_on_bytes_and_arrays():
    assert b"acgtu".translate(UPPERCASE) == b"ACGTU"
    assert b"ACGTt".translate(DNA_TO_RNA) == b"ACGUu"
    assert RNA_TO_DNA[as_tokens(b"AUGu")].tobytes() == b"ATGt"
    assert not UPPERCASE.flags.writeable
