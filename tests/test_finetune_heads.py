"""Sequence classification / regression heads: metrics against hand-computed values, labels from headers or a
CSV, `evo2 finetune --task classify|regress` end to end on the `test` preset, bad labels; the training loop's
guard, signals, exact resume, DDP and FSDP2 for a head."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet
from rich.console import Console
from safetensors import safe_open
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import build_config
from evo2_cli.errors import Evo2Error, InputError
from evo2_cli.finetune import FinetuneJob, finetune, load_finetuned, prepare
from evo2_cli.finetune.config import LabelsSection
from evo2_cli.finetune.heads import (
    auroc,
    classification_metrics,
    rankdata,
    read_labeled,
    sequence_outputs,
    spearman,
)
from evo2_cli.model import StripedHyena, preset_config
from evo2_cli.train.step import StepInfo, TrainHooks


def test_rankdata_auroc_and_spearman_match_hand_computed_values():
    np.testing.assert_array_equal(rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    # 4 (positive, negative) pairs, 3 ordered correctly
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # ties count half: positives {0.5, 0.9} vs negatives {0.5, 0.5} -> (0.5 + 0.5 + 1 + 1) / 4
    assert auroc(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == 0.75
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    # ranks of y: [1, 2, 3.5, 5, 3.5]; covariance of centred ranks 8, variances 10 and 9.5
    assert spearman(np.array([1, 2, 3, 4, 5.0]), np.array([5, 6, 7, 8, 7.0])) == pytest.approx(
        8 / math.sqrt(95)
    )
    assert spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)
    # three classes: accuracy 2/3; one-vs-rest AUROCs: class 0 1, class 1 (1 + 0.5) / 2 (a tie with
    # row 2), class 2 0.5 (all scores tie) -> macro 0.75
    logits = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 2.0, 0.0]])
    metrics = classification_metrics(logits, np.array([0, 1, 2]))
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["auroc"] == pytest.approx(0.75)


def labeled_fasta(path: Path, records: int = 24, length: int = 32, seed: int = 0) -> None:
    """Records whose GC content spreads over 0.1..0.9: header `label=gc|at` (GC above or below one half)
    and `gc=FRACTION`."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(records):
        p_gc = 0.1 + 0.8 * ((7 * i) % records) / (records - 1)
        bases = rng.choice(list("GCAT"), size=length, p=[p_gc / 2, p_gc / 2, (1 - p_gc) / 2, (1 - p_gc) / 2])
        fraction = float(np.isin(bases, ["G", "C"]).mean())
        lines += [f">r{i} label={'gc' if fraction > 0.5 else 'at'} gc={fraction:.4f}", "".join(bases)]
    path.write_text("\n".join(lines) + "\n")


def task_job(
    fasta: Path, base: Path, run_dir: Path, task: str, regex: str, train: dict | None = None, **finetune
) -> FinetuneJob:
    raw = {
        "data": {"seq_len": 32},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "global_batch": 8, "weight_decay": 0.0},
        "train": {
            "run_dir": str(run_dir),
            "max_steps": 12,
            "micro_batch": 8,
            "log_interval": 4,
            "eval_interval": 0,
            "save_interval": 0,
            "device": "cpu",
            **(train or {}),
        },
        "finetune": {
            "init_from": str(base),
            "task": task,
            "labels": {"fasta": [str(fasta)], "header_regex": regex, "val_fraction": 0.25},
            **finetune,
        },
    }
    return build_config(FinetuneJob, raw)


def test_classify_head_learns_gc_content(base, tmp_path, monkeypatch):
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta)
    monkeypatch.chdir(tmp_path)
    job = task_job(fasta, base, Path("run"), "classify", r"label=(\S+)")
    result = finetune(job, console=quiet())
    assert result.step == 12
    assert result.last_val["accuracy"] == 1.0 and result.last_val["auroc"] == 1.0
    assert result.best_checkpoint.parent == Path("run/checkpoints")  # as run_dir was given
    model = load_finetuned(result.checkpoint)  # the head comes back with its classes
    assert model.task_classes == ["at", "gc"] and model.task_head.out_features == 2
    ids = torch.tensor([list(b"GCGCGGCCGC"), list(b"ATATTAATAT")])
    with torch.no_grad():
        assert sequence_outputs(model, ids, torch.ones_like(ids, dtype=torch.bool)).argmax(1).tolist() == [
            1,
            0,
        ]
    assert finetune(job, console=quiet()).step == 12  # resumes at its last checkpoint: nothing left to do
    again = task_job(fasta, result.checkpoint, tmp_path / "again", "classify", r"label=(\S+)")
    with pytest.raises(InputError, match="holds a task head; start from the backbone checkpoint"):
        prepare(again)


def test_regress_head_with_lora_ranks_gc_content(base, tmp_path):
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta)
    job = task_job(fasta, base, tmp_path / "run", "regress", r"gc=(\S+)", method="lora")
    result = finetune(job, console=quiet())
    assert result.last_val["spearman"] > 0.7 and result.last_val["mse"] < 0.05  # random: ~0 and ~0.1
    weights = load_finetuned(result.checkpoint).state_dict()
    frozen = StripedHyena(preset_config("test")).state_dict().keys()
    assert frozen <= weights.keys() and {"task_head.weight", "task_head.bias"} <= weights.keys()
    with safe_open(result.checkpoint / "model.safetensors", "pt") as stored:  # what trained, nothing else
        assert set(stored.keys()) == weights.keys() - frozen
    assert finetune(job, console=quiet()).step == result.step  # resumes onto its base: nothing left to do


def test_labels_from_a_csv_and_missing_labels(tmp_path):
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta, records=8)
    table = tmp_path / "labels.csv"
    table.write_text("id,label\n" + "".join(f"r{i},{i % 3}\n" for i in range(8)))
    train, val, classes = read_labeled(LabelsSection(fasta=[fasta], csv=table), "classify", 16, 0)
    assert classes == ["0", "1", "2"] and len(train.ids) + len(val.ids) == 8
    assert all(len(s) == 16 for s in train.sequences)  # cut to seq_len
    table.write_text("id,label\n" + "".join(f"r{i},{i}\n" for i in range(6)))
    with pytest.raises(InputError, match=r"2 record\(s\) have no label from labels.csv .*r6, .*r7"):
        read_labeled(LabelsSection(fasta=[fasta], csv=table), "regress", 16, 0)
    # every header label is 'at' or 'gc': the first record is named with its file and line
    expected = r"numeric labels; record r0 \(\S*labeled.fa:1\) has label 'at' .*and 7 other record\(s\)"
    with pytest.raises(InputError, match=expected):
        read_labeled(LabelsSection(fasta=[fasta], header_regex=r"label=(\S+)"), "regress", 16, 0)
    table.write_text("id,label\n" + "".join(f"r{i},{'nan' if i == 5 else i}\n" for i in range(8)))
    with pytest.raises(
        InputError, match=r"record r5 \(\S*labeled.fa:11\) has label 'nan' from labels.csv \S+; use"
    ):
        read_labeled(LabelsSection(fasta=[fasta], csv=table), "regress", 16, 0)


def test_cli_refuses_unlabeled_records_with_exit_2(base, tmp_path):
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta, records=6)
    fasta.write_text(fasta.read_text() + ">unlabeled\nACGT\n")
    args = [
        "finetune",
        "--from",
        str(base),
        "--task",
        "classify",
        "--set",
        f"finetune.labels.fasta=[{fasta}]",
    ]
    args += ["--set", "finetune.labels.header_regex=label=(\\S+)", "--set", f"train.run_dir={tmp_path / 'r'}"]
    result = CliRunner().invoke(app, args)
    assert (
        result.exit_code == 2
        and "1 record(s) have no label" in result.output
        and "unlabeled" in result.output
    )


def test_a_bad_resume_writes_nothing(base, tmp_path):
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta)
    job = task_job(fasta, base, tmp_path / "run", "classify", r"label=(\S+)")
    with pytest.raises(InputError, match="elsewhere: not a training checkpoint"):
        finetune(job, resume=str(tmp_path / "elsewhere"), console=quiet())
    assert not (tmp_path / "run").exists()


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def head_job(fasta: Path, base: Path, run_dir: Path, **guard) -> FinetuneJob:
    job = task_job(fasta, base, run_dir, "classify", r"label=(\S+)", {"max_steps": 6, "log_interval": 1})
    return dataclasses.replace(job, guard=dataclasses.replace(job.guard, **guard))


def test_a_head_finetune_stops_on_a_signal_and_resumes_exactly(base, tmp_path):
    """SIGTERM saves a checkpoint at the end of the next step and stops; the resume logs what one straight
    run logs, bit for bit."""
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta)
    reference = finetune(head_job(fasta, base, tmp_path / "straight"), console=quiet())

    def sigterm_after_second_step(info: StepInfo) -> None:
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    job = head_job(fasta, base, tmp_path / "resumed")
    first = finetune(job, hooks=TrainHooks(after_step=sigterm_after_second_step), console=quiet())
    assert first.stop_reason == "signal" and first.step == 3
    second = finetune(job, console=quiet())
    assert second.step == 6 and first.losses + second.losses == reference.losses
    timing = ("tokens_per_s", "mfu", "eta_s")
    straight, resumed = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert [{**r, **{k: s[k] for k in timing}} for r, s in zip(straight, resumed, strict=True)] == resumed


def test_a_head_finetune_has_the_guard(base, tmp_path):
    """A non-finite gradient from step 2 on: steps skipped and reported, one rollback, then divergence."""
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta)

    def poison(info: StepInfo) -> None:
        if info.step >= 1:
            info.model.task_head.weight.grad.fill_(math.nan)

    out = io.StringIO()
    job = head_job(fasta, base, tmp_path / "run", max_bad_steps=2, max_rollbacks=1)
    with pytest.raises(Evo2Error, match="training diverged: 2 bad steps in a row after 1 rollback"):
        finetune(job, hooks=TrainHooks(after_backward=poison), console=Console(file=out, width=300))
    text = " ".join(out.getvalue().split())
    assert "step 2: non-finite" in text and "step skipped" in text and "task_head.weight" in text
    assert text.count("rolled back to") == 1 and "lr x0.5" in text
    assert [r["skipped"] for r in train_records(tmp_path / "run")] == [False, True, False, True]


@pytest.mark.slow
def test_a_head_trains_on_two_gloo_processes_as_on_one(base, tmp_path, torchrun):
    """2 processes with DDP to step 4, then 2 with FSDP2 to step 8, resuming each other's checkpoints, log the
    losses and validation metrics of 8 steps in one process (constant lr, so a run may stop and continue)."""
    fasta = tmp_path / "labeled.fa"
    labeled_fasta(fasta)
    sets = {
        "data.seq_len": 32,
        "optim.lr": 1e-2,
        "optim.min_lr": 1e-2,
        "optim.warmup_steps": 0,
        "optim.global_batch": 8,
        "optim.weight_decay": 0.0,
        "train.log_interval": 1,
        "train.eval_interval": 4,
        "train.save_interval": 4,
        "finetune.labels.fasta": f"[{fasta}]",
        "finetune.labels.val_fraction": 0.25,
        "finetune.labels.header_regex": r"label=(\S+)",
    }
    args = ["finetune", "--from", str(base), "--task", "classify", "--device", "cpu"]
    args += [f"--set={k}={v}" for k, v in sets.items()]

    def run(run_dir: Path, steps: int, micro_batch: int) -> list[str]:
        return [
            *args,
            f"--set=train.run_dir={run_dir}",
            f"--set=train.max_steps={steps}",
            f"--set=train.micro_batch={micro_batch}",
        ]

    one = CliRunner().invoke(app, run(tmp_path / "one", 8, 8))
    assert one.exit_code == 0, one.output
    ddp = torchrun(run(tmp_path / "mixed", 4, 4), 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("checkpoint: ") == 1 and ddp.stderr.count("classify: ") == 1  # rank 0 reports
    fsdp = torchrun([*run(tmp_path / "mixed", 8, 4), "--set=train.parallelism=fsdp"], 2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]

    def logged(run_dir: Path) -> tuple[list[float], list[float]]:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["kind"] == "train"]
        return losses, [
            r[k] for r in records if r["kind"] == "val" for k in ("val_loss", "accuracy", "auroc")
        ]

    (mixed_losses, mixed_val), (losses, val) = logged(tmp_path / "mixed"), logged(tmp_path / "one")
    assert len(mixed_losses) == 8 and mixed_losses == pytest.approx(losses, abs=1e-5)
    assert len(val) == 6 and mixed_val == pytest.approx(val, abs=1e-5)
