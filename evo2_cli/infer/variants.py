"""Variant effect scores: delta log-likelihood (alt - ref) of a window of the reference around each variant.

Input: a TSV with columns chrom, pos, ref, alt (1-based pos; an optional header line; '#' lines skipped), or
a VCF (recognized by a `##fileformat=VCF` or `#CHROM` line: CHROM POS ID REF ALT ...; multi-allelic ALT gives
one row per allele; symbolic alleles such as <DEL> or * are refused). Alleles are DNA letters; indels work.

For each variant the reference window is `window` bases centred on the variant (shifted to stay inside the
chromosome); the alt window is the same window with ref replaced by alt. Both are scored like `evo2 infer
score` (sum of log p(x_t | x_<t) over t >= 1, upper-cased; never windowed: a window longer than `chunk`
tokens goes through the chunked prefill, exactly) and the row reports
    delta_sum_ll  = sum_ll(alt window) - sum_ll(ref window)
    delta_mean_ll = mean_ll(alt window) - mean_ll(ref window)  (the Evo 2 paper's score for SNVs).
A ref allele that does not match the reference is an error naming the line (or, with on_mismatch='skip', a
row with status 'ref_mismatch' and empty scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evo2_cli.data.alphabet import UPPERCASE
from evo2_cli.errors import InputError, shorten
from evo2_cli.infer.config import DEFAULT_BATCH_TOKENS, DEFAULT_CHUNK, DEFAULT_WINDOW, Context, OnMismatch
from evo2_cli.infer.context import per_token_pieces
from evo2_cli.infer.scoring import logprob_readout
from evo2_cli.infer.sequences import encode_dna, read_sequences
from evo2_cli.model.model import StripedHyena

VARIANT_COLUMNS = (
    "chrom",
    "pos",
    "ref",
    "alt",
    "status",
    "window_start",
    "ref_sum_ll",
    "alt_sum_ll",
    "delta_sum_ll",
    "delta_mean_ll",
)


@dataclass(frozen=True)
class Variant:
    chrom: str
    pos: int  # 1-based
    ref: str
    alt: str
    line: int  # line of the input file


def read_variants(path: Path) -> list[Variant]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the variant list: {exc}") from None
    lines = text.splitlines()
    vcf = any(line.startswith(("##fileformat=VCF", "#CHROM")) for line in lines[:1000])
    ref_col, alt_col = (3, 4) if vcf else (2, 3)
    variants: list[Variant] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\r").split("\t") if "\t" in line else line.split()
        if not vcf and not variants and len(fields) > 1 and fields[1].lower() in ("pos", "position"):
            continue  # a header line: chrom pos ref alt
        where = f"{path}:{number}"
        if len(fields) <= alt_col:
            columns = "CHROM POS ID REF ALT" if vcf else "chrom pos ref alt"
            raise InputError(f"{where}: expected the columns {columns}, got {len(fields)} field(s)")
        try:
            pos = int(fields[1])
        except ValueError:
            raise InputError(f"{where}: position {shorten(repr(fields[1]))} is not an integer") from None
        if pos < 1:
            raise InputError(f"{where}: position {pos} must be >= 1 (1-based)")
        ref = fields[ref_col]
        encode_dna(ref, f"{where}: ref allele")
        for alt in fields[alt_col].split(","):
            if alt.startswith("<") or alt in ("*", "."):
                problem = f"symbolic or missing ALT allele {shorten(repr(alt))} is not supported"
                raise InputError(f"{where}: {problem}")
            encode_dna(alt, f"{where}: alt allele")
            variants.append(Variant(fields[0], pos, ref.upper(), alt.upper(), number))
    if not variants:
        raise InputError(f"{path}: no variants (expected lines of chrom, pos, ref, alt)")
    return variants


@dataclass(frozen=True)
class VariantScore:
    variant: Variant
    status: str  # 'ok' or 'ref_mismatch'
    window_start: int = 0  # 0-based start of the reference window
    ref_sum_ll: float = float("nan")
    alt_sum_ll: float = float("nan")
    delta_sum_ll: float = float("nan")
    delta_mean_ll: float = float("nan")

    def row(self) -> dict[str, object]:
        v = self.variant
        values = (
            v.chrom,
            v.pos,
            v.ref,
            v.alt,
            self.status,
            self.window_start + 1,
            self.ref_sum_ll,
            self.alt_sum_ll,
            self.delta_sum_ll,
            self.delta_mean_ll,
        )
        return dict(zip(VARIANT_COLUMNS, values, strict=True))


def load_reference(path: Path, chroms: set[str]) -> dict[str, np.ndarray]:
    """Upper-cased tokens of the reference records named in `chroms` (by first header word)."""
    found = {s.id: s.tokens for s in read_sequences(path) if s.id in chroms}
    missing = sorted(chroms - set(found))
    if missing:
        named = ", ".join(map(shorten, missing[:5]))
        raise InputError(f"{path}: no record named {named} (the variants' chromosomes)")
    return found


def variant_windows(
    variant: Variant, chrom: np.ndarray, window: int, source: str, on_mismatch: OnMismatch
) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(start, ref window, alt window), or None for a skipped ref mismatch."""
    begin = variant.pos - 1
    ref = np.frombuffer(variant.ref.encode(), np.uint8)
    alt = np.frombuffer(variant.alt.encode(), np.uint8)
    found = chrom[begin : begin + len(ref)]
    if begin + len(ref) > len(chrom) or not np.array_equal(found, UPPERCASE[ref]):
        if on_mismatch == "skip":
            return None
        shown = found.tobytes().decode("ascii", "replace") if begin < len(chrom) else "(past the end)"
        raise InputError(
            f"{source}:{variant.line}: ref allele {variant.ref} does not match the reference at "
            f"{variant.chrom}:{variant.pos}, which holds {shown} (chromosome length {len(chrom)}); check the "
            "reference build and that positions are 1-based, or pass --on-mismatch skip"
        )
    start = min(max(0, begin + len(ref) // 2 - window // 2), max(0, len(chrom) - window))
    stop = min(len(chrom), start + window)
    ref_window = chrom[start:stop]
    alt_window = np.concatenate((chrom[start:begin], UPPERCASE[alt], chrom[begin + len(ref) : stop]))
    return start, ref_window, alt_window


Plan = tuple[int, np.ndarray, np.ndarray] | None  # what variant_windows returns


def plan_variants(
    variants: list[Variant],
    reference: dict[str, np.ndarray],
    window: int = DEFAULT_WINDOW,
    source: str = "variants",
    on_mismatch: OnMismatch = "error",
) -> list[Plan]:
    """The windows of every variant (`variant_windows`), in input order: a ref allele the reference does not
    hold fails here, before any model work (the config checks `window` >= 2)."""
    return [variant_windows(v, reference[v.chrom], window, source, on_mismatch) for v in variants]


def score_variants(
    model: StripedHyena,
    variants: list[Variant],
    reference: dict[str, np.ndarray],
    *,
    window: int = DEFAULT_WINDOW,
    chunk: int = DEFAULT_CHUNK,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    source: str = "variants",
    on_mismatch: OnMismatch = "error",
    on_tokens: Callable[[int], None] | None = None,
) -> list[VariantScore]:
    """One VariantScore per variant, in input order."""
    planned = plan_variants(variants, reference, window, source, on_mismatch)
    return score_planned(
        model, variants, planned, chunk=chunk, batch_tokens=batch_tokens, on_tokens=on_tokens
    )


def score_planned(
    model: StripedHyena,
    variants: list[Variant],
    planned: list[Plan],
    *,
    chunk: int = DEFAULT_CHUNK,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    on_tokens: Callable[[int], None] | None = None,
    before_long: Callable[[int], None] | None = None,
) -> list[VariantScore]:
    """`score_variants` on windows `plan_variants` already cut. `before_long`: see `per_token_pieces`."""
    # Alleles of one site share their reference window: score it once (every row shows the same ref_sum_ll).
    arrays: list[np.ndarray] = []
    ref_slots: dict[tuple[str, int], int] = {}
    slots: list[tuple[int, int, int] | None] = []  # (window start, ref array, alt array) per variant
    for variant, plan in zip(variants, planned, strict=True):
        if plan is None:
            slots.append(None)
            continue
        start, ref_window, alt_window = plan
        key = (variant.chrom, start)
        if key not in ref_slots:
            ref_slots[key] = len(arrays)
            arrays.append(ref_window)
        slots.append((start, ref_slots[key], len(arrays)))
        arrays.append(alt_window)
    sums = np.zeros(len(arrays), np.float64)  # sum of log p over positions >= 1 of each scored window
    pieces = per_token_pieces(
        model,
        arrays,
        logprob_readout(model),
        Context(chunk=chunk, batch_tokens=batch_tokens),
        on_tokens=on_tokens,
        before_long=before_long,
    )
    first = -1
    for index, piece in pieces:
        if index != first:  # a window's first piece: position 0 has no context (NaN), not scored
            piece, first = piece[1:], index
        sums[index] += piece.sum(dtype=np.float64)
    results = []
    for variant, slot in zip(variants, slots, strict=True):
        if slot is None:
            results.append(VariantScore(variant, "ref_mismatch"))
            continue
        start, ref_at, alt_at = slot
        ref_sum, alt_sum = float(sums[ref_at]), float(sums[alt_at])
        ref_n, alt_n = max(len(arrays[ref_at]) - 1, 1), max(len(arrays[alt_at]) - 1, 1)
        delta_mean = alt_sum / alt_n - ref_sum / ref_n
        results.append(VariantScore(variant, "ok", start, ref_sum, alt_sum, alt_sum - ref_sum, delta_mean))
    return results
