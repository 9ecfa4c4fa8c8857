"""Sequence classification / regression on labeled FASTA: a pooled head on the backbone, its metrics, and
its objective (`SequenceTask`) for the one training loop of evo2_cli/train/loop.py, which gives a head
finetune what it gives every run: DDP / FSDP2, the guard, signals, exact resume.

    head        `model.task_head`: Linear(D, outputs) on the mean over real tokens of the final-normed
                last hidden state (padding masked out); classes for classify, 1 output for regress
    labels      from the header (`labels.header_regex`, one group) or a CSV `id,label`; every record needs
                one (missing labels are listed, exit 2); records go to val by a stable hash of their id
    metrics     classify: loss (cross-entropy), accuracy, AUROC (binary; macro one-vs-rest for more classes)
                regress:  loss (MSE), MSE, Spearman rank correlation
    checkpoints the LM loop's layout; meta.json["task"] = {kind, outputs, classes} so `load_finetuned`
                rebuilds the head
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evo2_cli.data.alphabet import PAD_ID, UPPERCASE
from evo2_cli.data.fasta import display, read_fasta
from evo2_cli.data.splits import split_of
from evo2_cli.errors import InputError, shorten
from evo2_cli.finetune.config import FinetuneJob, LabelsSection
from evo2_cli.train.step import Objective

HEAD_NAME = "task_head"


# ---------------------------------------------------------------- the head


def attach_head(model: nn.Module, outputs: int, seed: int = 0) -> nn.Linear:
    """Give `model` a `task_head` Linear(hidden, outputs): small normal weights, zero bias."""
    hidden = model.config.hidden_size
    device = model.embedding_layer.weight.device
    head = nn.Linear(hidden, outputs, device=device)
    if device.type != "meta":
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            head.weight.copy_(torch.randn(outputs, hidden, generator=generator) / math.sqrt(hidden))
            head.bias.zero_()
    model.add_module(HEAD_NAME, head)
    return head


def is_head_parameter(name: str) -> bool:
    return name.startswith(HEAD_NAME + ".")


def sequence_outputs(model: nn.Module, input_ids: Tensor, mask: Tensor) -> Tensor:
    """(B, L) ids and (B, L) mask of real tokens -> head outputs (B, outputs), fp32. `model` may be wrapped
    in DDP: the final norm and the head are then those of the module it wraps."""
    _, hidden = model(input_ids, return_hidden_layers=[-1])
    inner = getattr(model, "module", model)
    normed = inner.norm(hidden[-1]).float()  # (B, L, D)
    weights = mask.float().unsqueeze(-1)  # (B, L, 1)
    pooled = (normed * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, D)
    head = getattr(inner, HEAD_NAME)
    return head(pooled.to(head.weight.dtype)).float()


# ---------------------------------------------------------------- metrics (numpy)


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting half
    (Mann-Whitney U / (n_pos n_neg)). NaN when a class is absent."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the (tie-averaged) ranks; NaN when either side is constant."""
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy and AUROC (binary: of class 1; more classes: macro one-vs-rest over present classes)."""
    accuracy = float((logits.argmax(1) == labels).mean())
    if logits.shape[1] == 2:
        score = auroc(logits[:, 1] - logits[:, 0], labels == 1)
    else:
        per_class = [auroc(logits[:, c], labels == c) for c in range(logits.shape[1])]
        present = [a for a in per_class if not math.isnan(a)]
        score = float(np.mean(present)) if present else math.nan
    return {"accuracy": accuracy, "auroc": score}


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    return {"mse": float(((predictions - targets) ** 2).mean()), "spearman": spearman(predictions, targets)}


# ---------------------------------------------------------------- labeled records


@dataclass
class LabeledRecords:
    ids: list[str]
    sequences: list[np.ndarray]  # upper-cased byte tokens, cut to seq_len
    targets: np.ndarray  # int64 class indices (classify) or float32 values (regress)


def _csv_labels(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the labels CSV: {exc}") from None
    if rows and [cell.strip().lower() for cell in rows[0]] == ["id", "label"]:
        rows = rows[1:]
    labels = {}
    for number, row in enumerate(rows, 1):
        if len(row) != 2:
            raise InputError(f"{path}: row {number} has {len(row)} columns; expected id,label")
        labels[row[0].strip()] = row[1].strip()
    return labels


def read_labeled(
    section: LabelsSection, task: str, seq_len: int, seed: int
) -> tuple[LabeledRecords, LabeledRecords, list[str] | None]:
    """(train, val, classes) from the labeled FASTA files; classes is None for regression."""
    table = _csv_labels(section.csv) if section.csv is not None else None
    pattern = re.compile(section.header_regex) if section.header_regex is not None else None
    ids, raw_labels, sequences, places, missing = [], [], [], [], []
    for path in section.fasta:
        if not Path(path).is_file():
            raise InputError(f"{path}: labeled FASTA file not found (finetune.labels.fasta)")
        for record in read_fasta(path):
            if record.problem:
                raise InputError(record.problem)
            record_id = display(record.id)
            if table is not None:
                label = table.get(record_id)
            else:
                match = pattern.search(display(record.header))
                label = match.group(1) if match else None
            if label is None or label == "":
                missing.append(f"{path}:{record.line} {shorten(record_id)}")
                continue
            ids.append(record_id)
            raw_labels.append(label)
            places.append(f"{path}:{record.line}")
            tokens = UPPERCASE[np.frombuffer(record.sequence, dtype=np.uint8)][:seq_len]
            sequences.append(tokens)
    source = (
        f"labels.csv {section.csv}" if table is not None else f"labels.header_regex {section.header_regex!r}"
    )
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(
            f"{len(missing)} record(s) have no label from {source}: {', '.join(missing[:5])}{more}; "
            "label every record or remove the unlabeled ones"
        )
    if not ids:
        raise InputError(f"no records in {', '.join(map(str, section.fasta))}")
    if any(len(s) == 0 for s in sequences):
        empty = [i for i, s in zip(ids, sequences, strict=True) if len(s) == 0]
        listed = ", ".join(map(shorten, empty[:5]))
        raise InputError(f"empty sequence(s): {listed}; every labeled record needs bases")
    classes = None
    if task == "classify":
        classes = sorted(set(raw_labels))
        if len(classes) < 2:
            raise InputError(f"task classify needs at least 2 classes; every record is labeled {classes}")
        targets = np.array([classes.index(label) for label in raw_labels], dtype=np.int64)
    else:
        bad = [i for i, label in enumerate(raw_labels) if not _is_number(label)]
        if bad:
            first = bad[0]
            others = (
                f", and {len(bad) - 1} other record(s) are not finite numbers either" if len(bad) > 1 else ""
            )
            raise InputError(
                f"task regress needs finite numeric labels; record {shorten(ids[first])} ({places[first]}) "
                f"has label {shorten(repr(raw_labels[first]))} from {source}{others}; use --task classify "
                "for categories"
            )
        targets = np.array([float(label) for label in raw_labels], dtype=np.float32)
    fraction = section.val_fraction
    in_val = np.array([split_of(i.encode(), seed, (1 - fraction, fraction, 0.0)) == 1 for i in ids])
    if in_val.all() or not in_val.any():
        raise InputError(
            f"{len(ids)} labeled records give an empty {'train' if in_val.all() else 'val'} split with "
            f"labels.val_fraction={fraction}; add records or change the fraction"
        )

    def subset(keep: np.ndarray) -> LabeledRecords:
        chosen = np.flatnonzero(keep)
        return LabeledRecords([ids[i] for i in chosen], [sequences[i] for i in chosen], targets[chosen])

    return subset(~in_val), subset(in_val), classes


def _is_number(text: str) -> bool:
    """A finite float: 'nan' and 'inf' are no regression targets."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def collate(records: LabeledRecords, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (B, L) padded with PAD_ID, mask (B, L), targets (B,)) for the given records."""
    length = max(len(records.sequences[i]) for i in indices)
    ids = np.full((len(indices), length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(indices), length), dtype=bool)
    for row, i in enumerate(indices):
        tokens = records.sequences[i]
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, True
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(records.targets[indices])


def task_loss(outputs: Tensor, targets: Tensor, task: str, reduction: str = "mean") -> Tensor:
    if task == "classify":
        return F.cross_entropy(outputs, targets, reduction=reduction)
    return F.mse_loss(outputs[:, 0], targets.float(), reduction=reduction)


def sample_indices(count: int, seed: int, first: int, size: int) -> list[int]:
    """Sample positions first..first+size-1 of an endless sequence of epochs, each a permutation drawn
    from (seed, epoch): the same positions give the same records on every run, resumed or not."""
    out = []
    for position in range(first, first + size):
        epoch, offset = divmod(position, count)
        out.append(int(np.random.default_rng((seed, 2, epoch)).permutation(count)[offset]))
    return out


# ---------------------------------------------------------------- the objective


class SequenceTask(Objective):
    """The training loop's objective for a head: the samples of the stream are labeled records drawn epoch by
    epoch (`sample_indices`), the loss is summed over them (cross-entropy or squared error), the validation
    metrics are over every val record (each process evaluates them all)."""

    evaluates = True

    def __init__(self, job: FinetuneJob):
        self.kind, self.seed = job.finetune.task, job.train.seed
        self.train_set, self.val_set, self.classes = read_labeled(
            job.finetune.labels, self.kind, job.data.seq_len, self.seed
        )
        self.outputs = len(self.classes) if self.classes else 1
        self.meta = {"task": {"kind": self.kind, "outputs": self.outputs, "classes": self.classes}}

    def summary(self) -> str:
        classes = f", classes {self.classes}" if self.classes else ""
        return (
            f"{self.kind}: {len(self.train_set.ids)} train and {len(self.val_set.ids)} val records{classes}"
        )

    def batch(self, first: int, size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        indices = sample_indices(len(self.train_set.ids), self.seed, first, size)
        return tuple(t.to(device) for t in collate(self.train_set, indices))

    def weight(self, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return torch.tensor(float(len(batch[2])), device=batch[2].device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        ids, mask, targets = batch
        outputs = sequence_outputs(model, ids, mask)
        return task_loss(outputs, targets, self.kind, "sum"), outputs.new_zeros(0, dtype=torch.float64)

    @torch.no_grad()
    def evaluate(self, model, micro_batch: int, runtime) -> dict[str, float]:
        records, outputs = self.val_set, []
        model.eval()
        for first in range(0, len(records.ids), micro_batch):
            ids, mask, _ = collate(records, list(range(first, min(first + micro_batch, len(records.ids)))))
            with runtime.autocast():
                outputs.append(sequence_outputs(model, ids.to(runtime.device), mask.to(runtime.device)).cpu())
        model.train()
        out = torch.cat(outputs)
        metrics = {"val_loss": task_loss(out, torch.from_numpy(records.targets), self.kind).item()}
        if self.kind == "classify":
            return metrics | classification_metrics(out.numpy(), records.targets)
        return metrics | regression_metrics(out[:, 0].numpy(), records.targets)
