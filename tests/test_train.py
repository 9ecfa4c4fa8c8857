"""`evo2 train` end to end on the `test` preset: resume, signals, guard, processes, bad input."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quiet, random_dataset
from rich.console import Console
from typer.testing import CliRunner

from evo2_cli.cli import app
from evo2_cli.config import build_config
from evo2_cli.data.indexed import IndexedDatasetWriter
from evo2_cli.data.preprocess import PreprocessConfig, run_preprocess
from evo2_cli.errors import Evo2Error
from evo2_cli.model import StripedHyena, estimate_flops, load_model
from evo2_cli.train.config import TrainJob
from evo2_cli.train.data import no_val_message, split_windows, validation_windows
from evo2_cli.train.loop import StepInfo, TrainHooks, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small mixed-case dataset with a tagged record: toy_train / toy_val."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    bases = np.frombuffer(b"ACGTACGTacgt", np.uint8)
    for split, length in (("train", 6000), ("val", 1500)):
        with IndexedDatasetWriter(root / f"toy_{split}") as writer:
            for _ in range(3):
                writer.add_document(np.concatenate([rng.choice(bases, length), [0]]).astype(np.uint8))
            tag = np.frombuffer(b"|d__Bacteria;s__toy|", np.uint8)
            writer.add_document(np.concatenate([tag, rng.choice(bases, 300), [0]]).astype(np.uint8))
    return root / "toy"


def make_job(dataset: Path, run_dir: Path, **sections) -> TrainJob:
    raw = {
        "model": {"preset": "test"},
        "data": {"datasets": [{"path": str(dataset)}], "seq_len": 32, "val_windows": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "global_batch": 4},
        "train": {
            "run_dir": str(run_dir),
            "max_steps": 6,
            "micro_batch": 2,
            "log_interval": 1,
            "eval_interval": 3,
            "save_interval": 3,
            "device": "cpu",
        },
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return build_config(TrainJob, raw)


def logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_train_learns_and_writes_a_loadable_checkpoint(dataset, tmp_path):
    job = make_job(
        dataset,
        tmp_path / "run",
        train={"max_steps": 12, "eval_interval": 6, "save_interval": 6, "peak_flops": 1e9},
    )
    console = quiet()
    result = train(job, console=console)
    assert result.step == 12 and result.stop_reason == "max_steps"
    printed = " ".join(console.file.getvalue().split())
    assert "MFU peak: 1e+09 FLOP/s per device (train.peak_flops)" in printed
    estimate = "memory: parameters 7,628 (trainable 7,628 = 100%); estimated memory per process (1 process)"
    assert printed.index(estimate) < printed.index("step 1/12")  # printed before the first step
    assert result.losses[-1] < result.losses[0] - 0.5
    model = load_model(result.checkpoint)  # the model package reads our checkpoint directories
    assert model.config.hidden_size == 8
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["step"] == 12 and meta["tokens_seen"] == 12 * 4 * 32
    assert set(meta["files"]) == {"model.safetensors", "config.yaml", "train_state.pt"}
    state = torch.load(result.checkpoint / "train_state.pt", weights_only=True)
    assert state["loop"]["data_position"] == 12 * 4
    # AdamW counted the 12 real steps only (not torch's lr-0 step that fills a fresh optimizer's state)
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {12.0}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [6, 12] and val[-1]["val_bits_per_base"] < 8
    assert {"loss", "bits_per_base", "lr", "grad_norm", "tokens_per_s", "mfu", "eta_s"} <= set(records[0])
    modes = {(result.checkpoint / name).stat().st_mode for name in ("model.safetensors", "config.yaml")}
    # the weights get the umask's permissions like every other file (safetensors would make them 0600)
    assert len(modes) == 1
    exported = CliRunner().invoke(
        app, ["convert", "to-vortex", str(tmp_path / "run"), "-o", str(tmp_path / "v.pt")]
    )
    assert exported.exit_code == 0, exported.output  # a run directory stands for its latest checkpoint
    train_flops_per_token = 3 * estimate_flops(job.model, 32) / 32  # forward + backward
    for record in records[1:]:
        if record["kind"] == "train":
            assert record["mfu"] == pytest.approx(train_flops_per_token * record["tokens_per_s"] / 1e9)
    assert result.best_checkpoint is not None


def test_interrupted_and_resumed_run_logs_the_same_losses(dataset, tmp_path):
    reference = train(make_job(dataset, tmp_path / "straight"), console=quiet()).losses

    def sigterm_after_second_step(info: StepInfo) -> None:
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    job = make_job(dataset, tmp_path / "resumed")
    first = train(job, hooks=TrainHooks(after_step=sigterm_after_second_step), console=quiet())
    assert first.stop_reason == "signal" and first.step == 3  # noticed at the end of the next step, saved
    second = train(job, console=quiet())
    assert second.step == 6
    np.testing.assert_allclose(first.losses + second.losses, reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(logged_losses(tmp_path / "resumed"), reference, rtol=0, atol=1e-6)
    # --resume DIR: a new run directory continuing from another run's step-3 checkpoint
    branch = train(make_job(dataset, tmp_path / "branch"), resume=str(first.checkpoint), console=quiet())
    np.testing.assert_allclose(branch.losses, reference[3:], rtol=0, atol=1e-6)


def test_first_ctrl_c_saves_and_a_second_aborts(dataset, tmp_path):
    def interrupt(count: int):
        def after_step(info: StepInfo) -> None:
            if info.step == 1:
                for _ in range(count):
                    os.kill(os.getpid(), signal.SIGINT)

        return TrainHooks(after_step=after_step)

    job = make_job(dataset, tmp_path / "once")
    result = train(job, hooks=interrupt(1), console=quiet())
    assert result.stop_reason == "signal" and result.step == 3 and result.checkpoint.name == "step_00000003"
    with pytest.raises(KeyboardInterrupt):
        train(make_job(dataset, tmp_path / "twice"), hooks=interrupt(2), console=quiet())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_early_stopping_keeps_the_best_checkpoint(dataset, tmp_path):
    """Weights wrecked after step 2: validation gets worse, patience 2 stops at step 4, best stays step 2."""

    def wreck(info: StepInfo) -> None:
        if info.step >= 2:
            with torch.no_grad():
                for p in info.model.parameters():
                    p.add_(torch.randn_like(p))

    job = make_job(
        dataset,
        tmp_path / "run",
        train={
            "max_steps": 50,
            "eval_interval": 1,
            "save_interval": 0,
            "keep_last": 1,
            "early_stopping_patience": 2,
        },
    )
    result = train(job, hooks=TrainHooks(after_step=wreck), console=quiet())
    assert result.stop_reason == "early_stopping" and result.step == 4
    assert result.best_checkpoint.name == "step_00000002"
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000002", "step_00000004"]  # keep_last 1 plus the best
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_losses = {r["step"]: r["val_loss"] for r in val if r["kind"] == "val"}
    meta = json.loads((result.best_checkpoint / "meta.json").read_text())
    assert meta["metrics"]["val_loss"] == min(val_losses.values()) == val_losses[2]


def test_a_dataset_without_a_val_split_trains_with_a_warning(dataset, tmp_path):
    """5 genomes at 0.9/0.05/0.05 leave val and test empty (no files): the run trains, says why it has no
    validation loss, and keeps no 'best' checkpoint; early stopping never fires."""
    rng = np.random.default_rng(1)
    fasta = tmp_path / "in.fa"
    fasta.write_bytes(
        b"".join(
            b">rec%d\n%s\n" % (i, rng.choice(np.frombuffer(b"ACGT", np.uint8), 100).tobytes())
            for i in range(5)
        )
    )
    out = tmp_path / "dataset"
    run_preprocess(PreprocessConfig(inputs=[str(fasta)], output_dir=out, split=(0.9, 0.05, 0.05)))
    assert not (out / "data_val.idx").exists()
    console = quiet()
    job = make_job(out, tmp_path / "run", train={"eval_interval": 1, "early_stopping_patience": 1})
    result = train(job, console=console)
    text = " ".join(console.file.getvalue().split())
    assert f"warning: no val split in {out}" in text and "training without validation loss" in text
    assert (result.step, result.stop_reason, result.last_val, result.best_checkpoint) == (
        6,
        "max_steps",
        None,
        None,
    )
    kinds = {
        json.loads(line)["kind"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    }
    assert kinds == {"train"} and (result.checkpoint / "meta.json").exists()
    # Blended with a dataset that has one: validation uses that dataset's windows only.
    blend = make_job(
        dataset, tmp_path / "blend", data={"datasets": [{"path": str(dataset)}, {"path": str(out)}]}
    )
    windows, without = validation_windows(blend.data, 0)
    assert without == [out] and [d.prefix for d in windows.datasets] == [f"{dataset}_val"]
    alone = split_windows(make_job(dataset, tmp_path / "alone").data, "val", 0)
    assert torch.equal(windows.batch(range(4)).input_ids, alone.batch(range(4)).input_ids)
    assert "validating on the other datasets" in no_val_message(without, validating=True)
    # A val split without a token (evo2-cli wrote those before) counts as none.
    with IndexedDatasetWriter(tmp_path / "old_train") as writer:
        writer.add_document(np.frombuffer(b"ACGT" * 50, np.uint8))
    with IndexedDatasetWriter(tmp_path / "old_val"):
        pass
    old = make_job(tmp_path / "old", tmp_path / "r").data
    assert validation_windows(old, 0) == (None, [tmp_path / "old"])


def test_accumulation_matches_one_big_micro_batch(dataset, tmp_path):
    big = make_job(dataset, tmp_path / "a", train={"max_steps": 2, "micro_batch": 4, "eval_interval": 0})
    small = make_job(dataset, tmp_path / "b", train={"max_steps": 2, "micro_batch": 1, "eval_interval": 0})
    np.testing.assert_allclose(
        train(small, console=quiet()).losses, train(big, console=quiet()).losses, rtol=0, atol=1e-6
    )


@pytest.mark.gpu
def test_cuda_trains_under_bf16_autocast_with_fp32_master_weights(dataset, tmp_path):
    cpu = train(make_job(dataset, tmp_path / "cpu", train={"max_steps": 4}), console=quiet())
    out = io.StringIO()
    job = make_job(dataset, tmp_path / "cuda", train={"max_steps": 4, "device": "auto"})
    cuda = train(job, console=Console(file=out, width=300))
    assert "1 x cuda (bf16 autocast)" in out.getvalue()
    np.testing.assert_allclose(cuda.losses, cpu.losses, rtol=0, atol=0.05)  # bf16 matmuls, fp32 filters
    weights = load_model(cuda.checkpoint).state_dict()
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_activation_checkpointing_gives_the_same_losses(dataset, tmp_path):
    plain = train(make_job(dataset, tmp_path / "a", train={"max_steps": 2}), console=quiet()).losses
    job = make_job(dataset, tmp_path / "b", train={"max_steps": 2, "activation_checkpointing": True})
    np.testing.assert_allclose(train(job, console=quiet()).losses, plain, rtol=0, atol=1e-6)


def test_guard_skips_spikes_rolls_back_and_gives_up(dataset, tmp_path):
    """Gradients poisoned from step 4 on: steps are skipped, the run rolls back twice, then gives up."""

    def poison(info: StepInfo) -> None:
        if info.step == 1:
            for p in info.model.parameters():
                p.grad.mul_(1e4)  # a spike
        if info.step >= 3:
            next(info.model.parameters()).grad.fill_(float("nan"))

    job = make_job(
        dataset,
        tmp_path / "run",
        train={"max_steps": 30, "eval_interval": 0, "save_interval": 2},
        guard={"warmup_steps": 1, "max_bad_steps": 2, "max_rollbacks": 2, "spike_factor": 100},
    )
    out = io.StringIO()
    with pytest.raises(Evo2Error, match="training diverged"):
        train(job, hooks=TrainHooks(after_backward=poison), console=Console(file=out, width=300))
    text = out.getvalue()
    assert "step 2: spike" in text and "largest gradients: " in text
    assert "started at embedding_layer.weight, the first non-finite gradient in backward order" in text
    assert text.count("non-finite gradients in 1 parameter(s), backward order: embedding_layer.weight") == 1
    assert text.count("rolled back to") == 2 and "lr x0.25" in text
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step_*"):
        load_model(checkpoint)  # strict: refuses non-finite values


def flat(text: str) -> str:
    return " ".join(text.split())


def test_guard_names_an_hcl_overflow_and_suggests_the_modal_form(dataset, tmp_path):
    """Three poles of the vortex hcl layer (layer 2 of `test`) at lambda = 5: exp(5 x 31) overflows fp32 in
    the first forward. The report names that layer, not the embedding (first in module order)."""
    job = make_job(
        dataset,
        tmp_path / "run",
        model={"hcl_form": "vortex"},
        train={"max_steps": 5, "eval_interval": 0},
        guard={"max_bad_steps": 1, "max_rollbacks": 0},
    )
    model = StripedHyena(job.model)
    with torch.no_grad():
        poles = model.blocks[2].filter.log_poles  # (D, S)
        poles.fill_(-0.5)
        poles[0, :3] = 5.0
    out = io.StringIO()
    with pytest.raises(Evo2Error, match="training diverged"):
        train(job, model=model, console=Console(file=out, width=300))
    text = flat(out.getvalue())
    assert (
        "step 1: non-finite (loss nan, grad norm nan), step skipped; started in layer 2 (hcl): forward "
        "overflow in the hcl filter of layer 2: max lambda 5 x (L - 1) = 155 > 88.7" in text
    )
    assert (
        "hcl layer 2: 3 pole(s) with lambda >= 0, largest 5 against the fp32 overflow bound 88.7/(L-1) = "
        "2.862 at L=32; `model.hcl_form: modal` keeps every lambda < 0" in text
    )
    assert "embedding_layer.weight" not in text.split("backward order:")[0]  # not named as the cause


def test_guard_names_the_first_bad_gradient_in_backward_order_and_lists_once(dataset, tmp_path):
    """NaN gradients in an early and a late layer: the one autograd finished first (nearer the loss) is the
    origin, though module order puts the other first; the same list is not printed again."""

    def poison(info: StepInfo) -> None:
        weights = dict(info.model.named_parameters())
        for name in ("blocks.0.mlp.l1.weight", "blocks.3.mlp.l3.weight"):
            weights[name].grad.fill_(float("nan"))

    job = make_job(
        dataset,
        tmp_path / "run",
        train={"max_steps": 5, "eval_interval": 0},
        guard={"max_bad_steps": 2, "max_rollbacks": 0},
    )
    out = io.StringIO()
    with pytest.raises(Evo2Error, match="training diverged"):
        train(job, hooks=TrainHooks(after_backward=poison), console=Console(file=out, width=300))
    text = flat(out.getvalue())
    cause = "started at blocks.3.mlp.l3.weight, the first non-finite gradient in backward order; 2 non-finite"
    assert text.count(cause) == 2  # steps 1 and 2
    listing = "non-finite gradients in 2 parameter(s), backward order: blocks.3.mlp.l3.weight, blocks.0.mlp"
    assert text.count(listing) == 1
    assert "hcl layer" not in text  # modal poles: always lambda < 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_args(dataset: Path, run_dir: Path, steps: int, micro_batch: int = 1) -> list[str]:
    """`evo2 train` arguments of a tiny CPU run with a constant lr, so that a run may stop early and continue
    with more steps (max_steps is not part of a run's identity)."""
    sets = {
        "model.preset": "test",
        "data.datasets": f"[{{path: {dataset}}}]",
        "data.seq_len": 32,
        "data.val_windows": 4,
        "optim.lr": 3e-3,
        "optim.min_lr": 3e-3,
        "optim.warmup_steps": 0,
        "optim.global_batch": 4,
        "train.micro_batch": micro_batch,
        "train.max_steps": steps,
        "train.save_interval": 3,
        "train.log_interval": 1,
        "train.eval_interval": 3,
        "train.run_dir": run_dir,
    }
    return [*(f"--set={k}={v}" for k, v in sets.items()), "--device=cpu"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_checkpoints_cross_process_counts(dataset, tmp_path, torchrun):
    """2 processes (torchrun, gloo, DDP) from scratch to step 3, 1 process to step 6, 2 processes with FSDP2
    to step 9, 1 process to step 12 = 12 steps in one process with the global batch in one micro-batch.
    Constant lr, so a run may stop early and continue with more steps on another process count."""

    def one_process(run_dir: Path, steps: int, micro_batch: int = 1) -> None:
        result = CliRunner().invoke(app, ["train", *cli_args(dataset, run_dir, steps, micro_batch)])
        assert result.exit_code == 0, result.output

    one_process(tmp_path / "one", 12, micro_batch=4)
    # a fresh run: the step-0 save is collective
    ddp = torchrun(["train", *cli_args(dataset, tmp_path / "mixed", 3)], 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("checkpoint: ") == 1  # rank 0 reports, rank 1 stays quiet
    one_process(tmp_path / "mixed", 6)  # resumes a 2-process checkpoint
    fsdp = torchrun(["train", *cli_args(dataset, tmp_path / "mixed", 9), "--set=train.parallelism=fsdp"], 2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    one_process(tmp_path / "mixed", 12)  # resumes a checkpoint that FSDP2 gathered

    np.testing.assert_allclose(logged_losses(tmp_path / "mixed"), logged_losses(tmp_path / "one"), atol=1e-5)
    val, ref = (
        [
            json.loads(x)["val_loss"]
            for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "val"
        ]
        for run in ("mixed", "one")
    )
    assert len(val) == 4 and val == pytest.approx(ref, abs=1e-5)


FAKE_SRUN = """#!/bin/bash
# srun on one node: drop srun's own options, run the command in its place (signals reach it directly)
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
    show) echo localhost ;;
    requeue) echo "$2" >> "$REQUEUE_LOG" ;;
esac
"""


def run_sbatch(
    arguments: list[str], bin_dir: Path, requeue_log: Path, *, signal_when=None, env_overrides=None
) -> tuple[int, str]:
    """Run examples/slurm/train.sbatch outside SLURM (fake srun/scontrol, one node, one process); send it
    SIGUSR1, as `--signal=B:USR1@...` would, once `signal_when()` is true."""
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "EVO2_PYTHON": sys.executable,
        "REQUEUE_LOG": str(requeue_log),
        "OMP_NUM_THREADS": "1",
        **(env_overrides or {}),
    }
    script = REPO / "examples" / "slurm" / "train.sbatch"
    with subprocess.Popen(
        ["bash", str(script), *arguments], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        if signal_when is not None:
            deadline = time.monotonic() + 240
            while not signal_when() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            process.send_signal(signal.SIGUSR1)
        output, _ = process.communicate(timeout=240)
    return process.returncode, output.decode()


FAKE_TORCHRUN = """#!/bin/bash
# Stands in for `python -m torch.distributed.run ... -m evo2_cli train`: one training process that saves and
# exits 0 on USR1. A launcher that gets USR1 itself behaves as torchrun does: forwards it, then exits 1.
{python} -c '
import pathlib, signal, sys, time
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
pathlib.Path(sys.argv[1]).touch()
while not stop:
    time.sleep(0.02)
print("stopping at step 7 (signal)")
' "$READY" &
worker=$!
trap 'kill -USR1 $worker; wait $worker; echo "SignalException: got signal 10"; exit 1' USR1
wait $worker
"""


def test_slurm_script_hands_usr1_to_the_training_and_reports_a_planned_stop(tmp_path):
    """USR1 to examples/slurm/train.sbatch reaches the training processes but not torchrun (which would end
    with a SignalException traceback and exit 1); the training exits 0 and the log says it was planned."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": FAKE_SRUN,
        "scontrol": FAKE_SCONTROL,
        "torchrun": FAKE_TORCHRUN.format(python=sys.executable),
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    ready, requeues = tmp_path / "ready", tmp_path / "requeues"
    code, out = run_sbatch(
        ["-c", "unused.yaml"],
        bin_dir,
        requeues,
        signal_when=ready.exists,
        env_overrides={"EVO2_PYTHON": str(bin_dir / "torchrun"), "READY": str(ready)},
    )
    assert code == 0, out
    assert "stopping at step 7" in out and "planned stop" in out and "SignalException" not in out
    assert requeues.read_text() == "42\n"


@pytest.mark.slow
def test_slurm_script_checkpoints_on_usr1_requeues_and_resumes(dataset, tmp_path):
    """What examples/slurm/train.sbatch relies on: USR1 to the batch script reaches the training through
    torchrun, the loop saves and exits cleanly, the script requeues; the requeued script resumes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir, requeues = tmp_path / "run", tmp_path / "requeues"

    def trained_a_step() -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and '"kind": "train"' in metrics.read_text()

    code, out = run_sbatch(cli_args(dataset, run_dir, 100_000), bin_dir, requeues, signal_when=trained_a_step)
    assert code == 0, out[-3000:]
    assert "USR1: time limit near" in out and "stopping at step" in out
    # The log says the stop was the planned one, without torchrun's SignalException traceback and exit 1.
    assert "planned stop" in out and "requeueing job 42" in out
    assert "Traceback" not in out and "SignalException" not in out and "exit code" not in out
    assert requeues.read_text() == "42\n"
    stopped_at = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())["step"]
    assert 1 <= stopped_at < 100_000

    code, out = run_sbatch(cli_args(dataset, run_dir, stopped_at + 1), bin_dir, requeues)
    assert code == 0, out[-3000:]
    assert "resumed from" in out and f"at step {stopped_at}" in out
    assert "training exited with status 0" in out and requeues.read_text() == "42\n"
    assert (
        json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())["step"] == stopped_at + 1
    )


# ---------------------------------------------------------------- bad input through the CLI


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    return result.exit_code, " ".join(result.output.split())  # messages wrap at the terminal width


def test_bad_input_exits_2_with_a_message(dataset, tmp_path):
    base = [
        "--set=model.preset=test",
        f"--set=train.run_dir={tmp_path / 'run'}",
        "--set=data.seq_len=32",
        f"--set=data.datasets=[{{path: {dataset}}}]",
        "--set=train.max_steps=1",
        "--device=cpu",
    ]
    code, out = cli(*base, "--set=optim.lr=0")
    assert code == 2 and "optim.lr" in out
    code, out = cli(*base, "--set=optim.global_batch=6", "--set=train.micro_batch=4")
    assert code == 2 and "global_batch" in out
    code, out = cli(*base, f"--set=data.datasets=[{{path: {tmp_path / 'nope'}}}]")
    assert code == 2 and "nope" in out
    code, out = cli(*base, "--set=data.seq_len=100000")
    assert code == 2 and "shorter than one window" in out
    code, out = cli(*base, f"--resume={tmp_path / 'elsewhere'}")
    assert code == 2 and "elsewhere: not a training checkpoint" in " ".join(out.split())
    assert not (tmp_path / "run").exists()  # a bad --resume fails before the run directory is claimed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = cli(*base, f"--set=train.run_dir={blocker / 'run'}")
    assert code == 2 and "cannot write the run directory" in out
    code, out = cli(*base)
    assert code == 0, out
    code, out = cli(*base, "--set=optim.lr=1e-2")
    assert code == 2 and "different config (optim.lr differ)" in out
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()  # nothing lost
    code, out = cli(*base, "--set=optim.lr=1e-2", "--overwrite")
    assert code == 0, out


def write_toy(prefix: Path, seed: int) -> None:
    """toy_train / toy_val of fixed document lengths: another seed is other content, same .idx."""
    prefix.parent.mkdir(exist_ok=True)
    random_dataset(prefix, seed, {"train": 3000, "val": 3000})


def test_resume_refuses_a_changed_dataset_unless_allowed(tmp_path):
    write_toy(tmp_path / "data" / "toy", seed=1)
    base = [
        "--set=model.preset=test",
        f"--set=train.run_dir={tmp_path / 'run'}",
        "--set=data.seq_len=32",
        f"--set=data.datasets=[{{path: {tmp_path / 'data' / 'toy'}}}]",
        "--set=train.save_interval=1",
        "--device=cpu",
    ]
    code, out = cli(*base, "--set=train.max_steps=1")
    assert code == 0, out
    write_toy(tmp_path / "data" / "toy", seed=2)  # regenerated at the same path with other content
    code, out = cli(*base, "--set=train.max_steps=2")
    text = " ".join(out.split())
    assert code == 2, out
    assert "the data changed since checkpoint" in text and "toy_train.bin content differs" in text
    assert "--allow-data-change" in text
    code, out = cli(*base, "--set=train.max_steps=2", "--allow-data-change")
    assert code == 0, out
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()


def test_dataset_identity_is_the_manifest_when_there_is_one(tmp_path):
    from evo2_cli.fsio import sha256_file
    from evo2_cli.train.data import dataset_changes, dataset_identity

    write_toy(tmp_path / "toy", seed=1)
    data = make_job(tmp_path, tmp_path / "run").data
    before = dataset_identity(data)
    assert set(before[str(tmp_path)]) == {"toy_train.idx", "toy_train.bin", "toy_val.idx", "toy_val.bin"}
    (tmp_path / "manifest.json").write_text('{"files": {}}\n')
    manifest = dataset_identity(data)
    assert manifest == {str(tmp_path): {"manifest.json": {"sha256": sha256_file(tmp_path / "manifest.json")}}}
    (tmp_path / "manifest.json").write_text('{"files": {"x": 1}}\n')
    changes = dataset_changes(manifest, dataset_identity(data))
    assert len(changes) == 1 and changes[0].startswith(f"{tmp_path}: manifest.json content differs (sha256 ")
    assert dataset_changes(manifest, manifest) == []


def test_train_reads_a_bionemo_nucleotide_tokenizer_directory_and_prefix(tmp_path):
    """BioNeMo's current recipe names its files PREFIX_nucleotide_fast_tokenizer_256_{split} (uint16 ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(5)
    prefix = tmp_path / "bionemo" / "og2_nucleotide_fast_tokenizer_256"
    prefix.parent.mkdir()
    for split in ("train", "val", "test"):
        builder = IndexedDatasetBuilder(f"{prefix}_{split}.bin", np.uint16)
        for _ in range(3):
            builder.add_item(torch.from_numpy(np.append(rng.choice(list(b"ACGTacgt"), 400), 0)))
            builder.end_document()
        builder.finalize(f"{prefix}_{split}.idx")
    losses = []
    for given in (prefix.parent, prefix):
        run_dir = tmp_path / f"run_{given.name}"
        code, out = cli(
            "--set=model.preset=test",
            f"--set=train.run_dir={run_dir}",
            "--set=data.seq_len=32",
            "--set=data.val_windows=2",
            f"--set=data.datasets=[{{path: {given}}}]",
            "--set=train.max_steps=2",
            "--set=train.log_interval=1",
            "--device=cpu",
        )
        assert code == 0, out
        losses.append(logged_losses(run_dir))
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_train_refuses_a_run_over_its_memory_with_the_fix(dataset, tmp_path):
    base = [
        "--set=model.preset=test",
        f"--set=train.run_dir={tmp_path / 'run'}",
        "--set=data.seq_len=32",
        f"--set=data.datasets=[{{path: {dataset}}}]",
        "--set=train.max_steps=1",
        "--device=cpu",
    ]
    # 7,628 parameters x 16 bytes = 119 KiB of weights, gradients and AdamW state: over a 100 KB limit
    code, out = cli(*base, "--set=train.memory_limit_gb=1e-4")
    assert code == 2, out
    assert (
        "this training run needs about" in out and "than the 104.86 KiB train.memory_limit_gb=0.0001" in out
    )
    assert "Set train.parallelism: fsdp and run N processes under torchrun" in out
    # 1 MiB: the weights fit, the activations of 8 windows of 32 do not
    code, out = cli(*base, "--set=train.memory_limit_gb=1e-3", "--set=train.micro_batch=8")
    assert (
        code == 2 and "Lower train.micro_batch or data.seq_len, or set train.activation_checkpointing" in out
    )
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code, out = cli(*base, "--set=train.memory_limit_gb=1e-3", "--set=train.micro_batch=1")
    assert code == 0, out
