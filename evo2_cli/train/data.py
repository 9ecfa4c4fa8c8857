"""Training windows: `seq_len + 1` tokens cut from a blend of Megatron indexed datasets.

Window `i` of a stream depends only on (seed, stream, i): its dataset (by blend weight), its start in that
dataset's concatenated tokens and its reverse-complement flip are drawn from an RNG seeded with exactly those
three numbers. A resumed run, or a run on another number of processes, therefore sees the same windows for the
same sample indices (DESIGN.md section 3).

A window becomes a `Batch` row (Savanna's `to_upper: normalized_weighted` recipe):
- inputs and labels are upper-cased; a lowercase label (a soft-masked repeat) gets `lowercase_weight`;
- phylogenetic tags `|d__...;...|` get weight 0, pipes included;
- EOD labels keep weight 1 (the model learns where a record ends), padding gets 0; the other special ids
  (2-4, written by BioNeMo's nucleotide tokenizers) are treated like EOD;
- `counts_as_base` marks nucleotide labels (not tags or special ids), the denominator of bits per base.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evo2_cli.data.alphabet import (
    MAX_TAG_BYTES,
    PAD_ID,
    SPECIAL_IDS,
    TAG_MARKERS,
    UPPERCASE,
    reverse_complement,
)
from evo2_cli.data.indexed import IndexedDataset, paths_of
from evo2_cli.errors import InputError
from evo2_cli.fsio import sha256_file
from evo2_cli.train.config import DataSection

PIPE = ord("|")
TAG_MARKER_IDS = np.frombuffer(TAG_MARKERS, dtype=np.uint8)  # the same bytes, for np.isin

TRAIN_STREAM, VAL_STREAM = 0, 1


@dataclass(frozen=True)
class Batch:
    """One micro-batch; every tensor is (B, L)."""

    input_ids: torch.Tensor  # int64, upper-cased
    labels: torch.Tensor  # int64, upper-cased, inputs shifted by one
    loss_weights: torch.Tensor  # float32: 1, lowercase_weight or 0
    counts_as_base: torch.Tensor  # bool: label is a nucleotide (not a tag, EOD or pad)

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.labels, self.loss_weights, self.counts_as_base)
            )
        )


def resolve_split(path: Path, split: str, missing_ok: bool = False) -> Path | None:
    """The dataset prefix of `split` ("train", "val", "test") for a configured path; None when `missing_ok`
    and the split has no files (`evo2 preprocess` writes none for an empty split).

    `path` is either a directory written by `evo2 preprocess` (or any directory holding exactly one
    `*_{split}.bin/.idx` pair), or a split-less prefix P with `P_{split}.bin/.idx` beside it."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*_{split}.idx"))
        if not found and missing_ok:
            return None
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise InputError(
                f"{path}: {what} '*_{split}.idx' dataset files in this directory; point data.datasets at "
                "an `evo2 preprocess` output directory or at a prefix P with P_train/P_val files"
            )
        return found[0].with_suffix("")
    prefix = Path(f"{path}_{split}")
    bin_path, idx_path = paths_of(prefix)
    if not idx_path.exists() and not bin_path.exists():
        if missing_ok:
            return None
        raise InputError(
            f"{path}: neither a directory nor a prefix of '{prefix}.bin/.idx'; run `evo2 preprocess` first "
            "or fix data.datasets"
        )
    return prefix


def _tag_mask(tokens: np.ndarray) -> np.ndarray:
    """True on tag tokens: a `|`, or a stretch between pipes that holds a tag-only byte (`_` or `;`)."""
    is_pipe = tokens == PIPE
    if not is_pipe.any():
        return np.zeros(len(tokens), dtype=bool)
    segment = np.cumsum(is_pipe)  # stretches between pipes share an id
    has_marker = np.bincount(segment, weights=np.isin(tokens, TAG_MARKER_IDS), minlength=segment[-1] + 1) > 0
    return is_pipe | has_marker[segment]


class WindowSampler:
    """Deterministic windows of `seq_len + 1` tokens from a weighted blend of indexed datasets."""

    def __init__(
        self,
        datasets: list[IndexedDataset],
        weights: list[float],
        seq_len: int,
        seed: int,
        stream: int,
        lowercase_weight: float = 0.1,
        reverse_complement_prob: float = 0.0,
    ):
        self.datasets = datasets
        for dataset in self.datasets:
            if len(dataset.tokens) < seq_len + 1:
                raise InputError(
                    f"{dataset.bin_path}: {len(dataset.tokens)} tokens, shorter than one window of "
                    f"seq_len + 1 = {seq_len + 1}; lower data.seq_len or add data"
                )
        total = float(sum(weights))
        self.cumulative_weights = np.cumsum(np.asarray(weights, dtype=np.float64) / total)
        self.seq_len, self.seed, self.stream = seq_len, seed, stream
        self.lowercase_weight = lowercase_weight
        self.reverse_complement_prob = reverse_complement_prob

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw tokens of window `index` (case kept, flipped when drawn) and their tag mask."""
        rng = np.random.default_rng((self.seed, self.stream, index))
        which = int(np.searchsorted(self.cumulative_weights, rng.random(), side="right"))
        dataset = self.datasets[min(which, len(self.datasets) - 1)]
        tokens = dataset.tokens
        width = self.seq_len + 1
        start = int(rng.integers(0, len(tokens) - width + 1))
        flip = rng.random() < self.reverse_complement_prob
        # Tags are at most MAX_TAG_BYTES long: this much context on each side shows a cut tag whole.
        lo, hi = max(0, start - MAX_TAG_BYTES), min(len(tokens), start + width + MAX_TAG_BYTES)
        context = np.asarray(tokens[lo:hi])
        if context.max() > 255:
            raise InputError(f"{dataset.bin_path}: token ids above 255; expected a byte-level dataset")
        context = context.astype(np.uint8)
        window = context[start - lo : start - lo + width]
        tags = _tag_mask(context)[start - lo : start - lo + width]
        if flip:
            return reverse_complement(window), tags[::-1].copy()
        return window.copy(), tags

    def batch(self, indices: range | list[int]) -> Batch:
        rows = [self.window(i) for i in indices]
        windows = np.stack([w for w, _ in rows])  # (B, L + 1) uint8
        tags = np.stack([t for _, t in rows])  # (B, L + 1) bool
        labels_raw = windows[:, 1:]
        weights = np.where(labels_raw != UPPERCASE[labels_raw], self.lowercase_weight, 1.0)
        ignored = tags[:, 1:] | (labels_raw == PAD_ID)
        weights = np.where(ignored, 0.0, weights).astype(np.float32)
        upper = UPPERCASE[windows].astype(np.int64)
        return Batch(
            input_ids=torch.from_numpy(upper[:, :-1].copy()),
            labels=torch.from_numpy(upper[:, 1:].copy()),
            loss_weights=torch.from_numpy(weights),
            counts_as_base=torch.from_numpy(~ignored & (labels_raw >= SPECIAL_IDS)),
        )


def split_windows(
    data: DataSection, split: str, seed: int, opened: list[IndexedDataset] | None = None
) -> WindowSampler:
    """The windows of `data`'s "train" split (stream 0, flipped as configured) or "val" split (stream 1,
    never flipped), drawn at `seed`; `opened`: that split of each dataset, opened already."""
    train = split == "train"
    return WindowSampler(
        opened or [IndexedDataset(resolve_split(source.path, split)) for source in data.datasets],
        [source.weight for source in data.datasets],
        data.seq_len,
        seed,
        TRAIN_STREAM if train else VAL_STREAM,
        data.lowercase_weight,
        data.reverse_complement_prob if train else 0.0,
    )


def validation_windows(data: DataSection, seed: int) -> tuple[WindowSampler | None, list[Path]]:
    """The "val" windows of the datasets that have a val split, blended by their weights, or None when none
    has one; and the configured paths of those without one: no val files (`evo2 preprocess` writes none for
    an empty split) or a val split without a token (as evo2-cli wrote empty splits before)."""
    with_val, opened, without = [], [], []
    for source in data.datasets:
        prefix = resolve_split(source.path, "val", missing_ok=True)
        dataset = IndexedDataset(prefix) if prefix is not None else None
        if dataset is None or not dataset.num_tokens:
            without.append(Path(source.path))
        else:
            with_val.append(source)
            opened.append(dataset)
    if not with_val:
        return None, without
    return split_windows(dataclasses.replace(data, datasets=with_val), "val", seed, opened), without


def no_val_message(without: list[Path], validating: bool) -> str:
    """What a run does without the val split of the datasets `without` (from validation_windows)."""
    names = ", ".join(map(str, without))
    if validating:
        return f"no val split in {names} (an empty split has no files); validating on the other datasets"
    return (
        f"no val split in {names} (an empty split has no files): training without validation loss, 'best' "
        "checkpoint or early stopping; with few records, preprocess.split_by: position holds out the tail of "
        "every record"
    )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, fp32: (B, L, V), (B, L) -> (B, L)."""
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), reduction="none"
    ).view_as(labels)


MANIFEST = "manifest.json"  # written by `evo2 preprocess`: sha256 of every file of the dataset
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 1 << 16  # a .bin's content sample: 16 evenly spaced 64 KiB blocks


def _sample_sha256(path: Path) -> str:
    """sha256 of a fixed sample of a file (1 MiB at most, whatever its size): new content of the same
    length, which leaves the .idx as it was, shows here."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for k in range(SAMPLE_BLOCKS):
            handle.seek(max(0, size - SAMPLE_BYTES) * k // (SAMPLE_BLOCKS - 1))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def dataset_identity(data: DataSection) -> dict[str, dict[str, dict]]:
    """What a checkpoint records of each configured dataset (keyed by its path as configured), cheap to take:
    the sha256 of its manifest.json (which holds the sha256 of every file), else the size and sha256 of its
    .idx files (the length and offset of every sequence) and the size and a sampled sha256 of its .bin
    files."""
    out = {}
    for source in data.datasets:
        path = Path(source.path)
        if (path / MANIFEST).is_file():
            out[str(source.path)] = {MANIFEST: {"sha256": sha256_file(path / MANIFEST)}}
            continue
        indexes = path.glob("*.idx") if path.is_dir() else path.parent.glob(f"{path.name}_*.idx")
        files = {}
        for idx in sorted(indexes):
            files[idx.name] = {"bytes": idx.stat().st_size, "sha256": sha256_file(idx)}
            bin_path = idx.with_suffix(".bin")
            if bin_path.is_file():
                files[bin_path.name] = {"bytes": bin_path.stat().st_size, "sha256": _sample_sha256(bin_path)}
        out[str(source.path)] = files
    return out


def dataset_changes(saved: dict[str, dict[str, dict]], current: dict[str, dict[str, dict]]) -> list[str]:
    """How the datasets differ from those a checkpoint recorded: one phrase per changed dataset."""
    changes = []
    for name, now in current.items():
        before = saved.get(name)
        if before is None:
            changes.append(f"{name}: not a dataset of the run that wrote the checkpoint")
            continue
        what = []
        for file in sorted(set(before) | set(now)):
            old, new = before.get(file), now.get(file)
            if old == new:
                continue
            if old is None or new is None:
                what.append(f"{file} {'added' if old is None else 'removed'}")
            elif old.get("bytes") != new.get("bytes"):
                what.append(f"{file} {old['bytes']} -> {new['bytes']} bytes")
            else:
                what.append(f"{file} content differs (sha256 {old['sha256'][:12]} -> {new['sha256'][:12]})")
        if what:
            changes.append(
                f"{name}: {', '.join(what[:3])}" + (f" and {len(what) - 3} more" if len(what) > 3 else "")
            )
    return changes
