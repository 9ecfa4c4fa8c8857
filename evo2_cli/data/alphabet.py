"""Byte-level token facts shared by every command (DESIGN.md section 3).

Evo 2 tokenizes bytes: a token id is the byte itself (A=65, C=67, G=71, T=84, lowercase kept), the vocab is
512 (ids >= 256 unused), EOD is 0 and padding is 1; there is no BOS.

    EOD_ID, PAD_ID, VOCAB_SIZE
    SPECIAL_IDS                 ids below it are special tokens, never bases
    TAG_MARKERS, MAX_TAG_BYTES  what makes `|...|` a phylogenetic tag, and its longest allowed form
    IUPAC_BYTES                 the sequence letters a FASTA record may hold (upper and lower case)
    COMPLEMENT, UPPERCASE,      256-entry uint8 lookup tables: `table[tokens]` maps a uint8 array and
    DNA_TO_RNA, RNA_TO_DNA,     `data.translate(table)` maps bytes; every other byte maps to itself
    AMBIGUITY_TO_N              (AMBIGUITY_TO_N: R Y S W K M B D H V -> N, case kept)
    reverse_complement(tokens)  a new uint8 array: reversed, complemented, case kept
"""

from __future__ import annotations

import numpy as np

EOD_ID = 0
PAD_ID = 1
VOCAB_SIZE = 512
# BioNeMo's nucleotide_fast_tokenizer_256 keeps the byte ids but reserves 0-4 for special tokens (0 and 1 as
# ours); a dataset written with it may hold ids 2-4, which are control bytes that no FASTA sequence has.
SPECIAL_IDS = 5

# Phylogenetic tags `|d__...;s__...|`: training finds them by these bytes (never in sequence) between two
# pipes, and reads this much context around a window to see a cut tag whole.
TAG_MARKERS = b"_;"
MAX_TAG_BYTES = 512

# A C G T and U, plus the ambiguity codes; N is any base.
IUPAC_UPPER = b"ACGTURYSWKMBDHVN"
IUPAC_BYTES = IUPAC_UPPER + IUPAC_UPPER.lower()


def _table(pairs: dict[bytes, bytes]) -> np.ndarray:
    table = np.arange(256, dtype=np.uint8)
    for source, target in pairs.items():
        table[np.frombuffer(source, np.uint8)] = np.frombuffer(target, np.uint8)
    table.flags.writeable = False  # shared by every caller
    return table


def _both_cases(pairs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {**pairs, **{s.lower(): t.lower() for s, t in pairs.items()}}


# U complements to A so that an RNA record's reverse complement is DNA-compatible.
COMPLEMENT = _table(_both_cases({b"ACGTURYSWKMBDHVN": b"TGCAAYRSWMKVHDBN"}))
UPPERCASE = _table({bytes(range(97, 123)): bytes(range(65, 91))})
DNA_TO_RNA = _table(_both_cases({b"T": b"U"}))
RNA_TO_DNA = _table(_both_cases({b"U": b"T"}))
AMBIGUITY_TO_N = _table(_both_cases({b"RYSWKMBDHV": b"N" * 10}))


def reverse_complement(tokens: np.ndarray) -> np.ndarray:
    """Reverse complement of a uint8 token array (case kept, non-IUPAC bytes such as EOD unchanged)."""
    return COMPLEMENT[np.asarray(tokens, dtype=np.uint8)[::-1]]
