"""DNA text to model tokens, as the training loop feeds them: byte tokens, upper-cased.

The model was trained on upper-cased bytes (soft-masked bases only change the loss weight), so every input
here is upper-cased with the alphabet's UPPERCASE table. Letters outside the IUPAC nucleotide codes are an
error naming the position (`policy='error'`) or become N (`policy='n'`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from evo2_cli.data.alphabet import IUPAC_BYTES, UPPERCASE
from evo2_cli.data.fasta import describe_byte, display, read_fasta
from evo2_cli.errors import InputError, shorten

InvalidPolicy = Literal["error", "n"]

_VALID = np.zeros(256, dtype=bool)
_VALID[np.frombuffer(IUPAC_BYTES, np.uint8)] = True
_N = ord("N")


def encode_dna(
    text: str | bytes, where: str, policy: InvalidPolicy = "error", fix: str = "use IUPAC nucleotide letters"
) -> np.ndarray:
    """Upper-cased uint8 tokens of a DNA/RNA string. `where` names it in errors ("--prompt 2").

    Empty input is an error; so is a non-IUPAC character under policy 'error' (message gives the 1-based
    position, then `fix`: a caller that offers a policy switch names it there); policy 'n' maps such
    characters to N.
    """
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    raw = raw.strip()
    if not raw:
        raise InputError(f"{where}: empty sequence; give at least one base")
    tokens = np.frombuffer(raw, dtype=np.uint8)
    bad = ~_VALID[tokens]
    if bad.any():
        if policy == "error":
            at = int(np.argmax(bad))
            raise InputError(f"{where}: position {at + 1} holds {describe_byte(int(tokens[at]))}; {fix}")
        tokens = np.where(bad, np.uint8(_N), tokens)
    return UPPERCASE[tokens]


@dataclass(frozen=True)
class Sequence:
    """A named input sequence: `tokens` upper-cased uint8."""

    id: str
    tokens: np.ndarray
    description: str = ""


def read_sequences(path: Path, on_bytes=None) -> Iterator[Sequence]:
    """Records of a FASTA file as upper-cased Sequences, in file order. A record the reader flags (a
    character outside IUPAC, an empty header) or an empty record is an InputError naming file and line."""
    for record in read_fasta(path, on_bytes=on_bytes):
        if record.problem:
            # The reader's hint is about preprocess options; keep only the diagnosis.
            raise InputError(record.problem.split("; fix the record")[0] + "; fix the record")
        if not record.sequence:
            raise InputError(
                f"{path}:{record.line}: record '{shorten(display(record.id))}' is empty; remove it or give "
                "it bases"
            )
        tokens = UPPERCASE[np.frombuffer(record.sequence, dtype=np.uint8)]
        header = display(record.header)
        words = header.split(None, 1)
        yield Sequence(words[0], tokens, words[1] if len(words) > 1 else "")


def tokens_to_text(tokens: np.ndarray) -> str:
    """uint8/int tokens as text; ids that are not printable letters (EOD, pad, ids >= 256) become N."""
    ids = np.asarray(tokens, dtype=np.int64)
    letters = (ids >= 65) & (ids <= 90) | (ids >= 97) & (ids <= 122)
    return np.where(letters, ids, _N).astype(np.uint8).tobytes().decode("ascii")
