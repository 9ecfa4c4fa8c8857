"""Training speed and memory on a CPU in fp32: the `evo2 train` loop against a bare training step.

    .venv/bin/python benchmarks/train_bench.py [--steps 10] [--json benchmarks/results/train.json]

What it measures, on the `small` preset (1.7 M parameters), on a synthetic random-DNA dataset:
- tokens/s and MFU of the training loop (`evo2_cli.train.loop.train`: windows from the indexed dataset,
  loss weights, forward, backward, gradient norm, guard, clipping, AdamW, logging every 5 steps) at
  seq_len 1k (8 windows per step) and 8k (1 window per step), 8,192 tokens per step either way;
- in the same run, a bare step of an identical model: forward, cross-entropy, backward, AdamW step on
  pre-made batches of the same shape. The two take turns step by step: the bare step runs inside the loop's
  `after_step` hook and its time is subtracted from the loop's step, so load from other jobs on the machine
  hits both alike. Each is the fastest of its timed steps (the least disturbed by other jobs); loop overhead
  = loop step / bare step - 1 (target: under 5%). Medians are in the JSON.
  Evaluation and checkpoint saves are off during the timed steps (their cost is set by the intervals);
- peak RSS of one training step at seq_len 32k (1 window) with and without activation checkpointing, each
  in a fresh child process: the whole process's peak and the peak minus what the process held before the
  step (the step's own memory). Target: checkpointing at least halves it.

MFU = 3 x `estimate_flops` (forward, FFT convolutions counted) x windows per second / peak FLOP/s, the peak
being the best fp32 1024^3 matmul measured at start-up (as the loop itself does on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evo2_cli.config import build_config  # noqa: E402
from evo2_cli.data.indexed import IndexedDatasetWriter  # noqa: E402
from evo2_cli.model import StripedHyena, estimate_flops, preset_config  # noqa: E402
from evo2_cli.train.config import TrainJob  # noqa: E402
from evo2_cli.train.loop import StepInfo, TrainHooks, train  # noqa: E402
from evo2_cli.train.metrics import measure_matmul_flops  # noqa: E402

SEED = 0
PRESET = "small"
SPEED_SHAPES = ((1024, 8), (8192, 1))  # (seq_len, windows per step): 8,192 tokens per step
RSS_SEQ_LEN = 32768
DATASET_BASES = 200_000
WARMUP_STEPS = 2


def write_dataset(directory: Path) -> Path:
    """Random ACGT documents, train and val splits: PREFIX_{train,val}.bin/.idx."""
    rng = np.random.default_rng(SEED)
    alphabet = np.frombuffer(b"ACGT", dtype=np.uint8)
    for split in ("train", "val"):
        with IndexedDatasetWriter(directory / f"bench_{split}") as writer:
            for _ in range(4):
                writer.add_document(np.append(rng.choice(alphabet, DATASET_BASES // 4), np.uint8(0)))
    return directory / "bench"


def make_job(
    dataset: Path, run_dir: Path, seq_len: int, windows: int, steps: int, checkpointing: bool
) -> TrainJob:
    return build_config(
        TrainJob,
        {
            "model": {"preset": PRESET},
            "data": {"datasets": [{"path": str(dataset)}], "seq_len": seq_len, "val_windows": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 1, "global_batch": windows},
            "train": {
                "run_dir": str(run_dir),
                "max_steps": steps,
                "seed": SEED,
                "micro_batch": windows,
                "device": "cpu",
                "log_interval": 5,
                "eval_interval": 0,
                "save_interval": 0,
                "activation_checkpointing": checkpointing,
                "peak_flops": 1.0,  # skip the loop's own matmul probe; MFU is computed here
            },
        },
    )


class BareStep:
    """forward, cross-entropy, backward, AdamW step, zero_grad: the least a training step can do."""

    def __init__(self, seq_len: int, windows: int):
        torch.manual_seed(SEED)
        self.model = StripedHyena(preset_config(PRESET))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        tokens = torch.tensor(list(b"ACGT"))[torch.randint(0, 4, (windows, seq_len + 1))]
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]

    def __call__(self) -> float:
        start = time.perf_counter()
        logits = self.model(self.inputs)  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), self.labels.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def measure_speed(dataset: Path, work: Path, seq_len: int, windows: int, steps: int, peak: float) -> dict:
    bare = BareStep(seq_len, windows)
    marks: list[float] = []  # loop clock at each after_step, minus the bare steps run so far
    bare_times: list[float] = []

    def interleave(info: StepInfo) -> None:
        now = time.perf_counter() - sum(bare_times)
        marks.append(now)
        bare_times.append(bare())

    job = make_job(dataset, work / f"speed_{seq_len}", seq_len, windows, WARMUP_STEPS + steps, False)
    train(job, hooks=TrainHooks(after_step=interleave), console=Console(file=io.StringIO()))
    loop_times = np.diff(marks)[WARMUP_STEPS - 1 :]  # step k's time: between the hooks of k - 1 and k
    bare_steady = bare_times[WARMUP_STEPS:]
    loop_step, bare_step = min(loop_times), min(bare_steady)
    flops_per_step = 3 * estimate_flops(preset_config(PRESET), seq_len) * windows
    tokens = seq_len * windows
    return {
        "seq_len": seq_len,
        "windows_per_step": windows,
        "timed_steps": len(loop_times),
        "loop_step_s": loop_step,
        "bare_step_s": bare_step,
        "loop_tokens_per_s": tokens / loop_step,
        "bare_tokens_per_s": tokens / bare_step,
        "loop_mfu": flops_per_step / loop_step / peak,
        "bare_mfu": flops_per_step / bare_step / peak,
        "loop_overhead": loop_step / bare_step - 1,
        "loop_step_median_s": statistics.median(loop_times),
        "bare_step_median_s": statistics.median(bare_steady),
    }


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM). Not ru_maxrss: Linux carries that over fork and
    exec, so a child would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(dataset: Path, run_dir: Path, checkpointing: bool) -> None:
    """One training step at RSS_SEQ_LEN in this (fresh) process; prints peak RSS figures as JSON."""
    torch.manual_seed(SEED)
    StripedHyena(preset_config(PRESET))  # allocator and library warm-up that every run pays
    before = peak_rss()
    job = make_job(dataset, run_dir, RSS_SEQ_LEN, 1, 1, checkpointing)
    start = time.perf_counter()
    train(job, console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(
        json.dumps(
            {"peak_rss_bytes": peak, "before_bytes": before, "step_bytes": peak - before, "s": seconds}
        )
    )


def measure_rss(dataset: Path, work: Path) -> dict:
    results = {}
    for checkpointing in (False, True):
        command = [
            sys.executable,
            __file__,
            "--rss-child",
            str(int(checkpointing)),
            "--dataset",
            str(dataset),
        ]
        command += ["--run-dir", str(work / f"rss_{int(checkpointing)}")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results["checkpointing" if checkpointing else "plain"] = json.loads(
            done.stdout.strip().splitlines()[-1]
        )
    plain, ckpt = results["plain"], results["checkpointing"]
    results["peak_ratio"] = ckpt["peak_rss_bytes"] / plain["peak_rss_bytes"]
    results["step_ratio"] = ckpt["step_bytes"] / plain["step_bytes"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per seq_len (after 2 warm-up steps)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rss-child", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args.dataset, args.run_dir, bool(args.rss_child))
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        work = Path(tmp)
        dataset = write_dataset(work)
        peak = measure_matmul_flops()
        speed = [
            measure_speed(dataset, work, length, windows, args.steps, peak)
            for length, windows in SPEED_SHAPES
        ]
        rss = measure_rss(dataset, work)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "load_average_before": load_before[0],
        "load_average_after": os.getloadavg()[0],
        "preset": PRESET,
        "peak_flops": peak,
        "speed": speed,
        "rss_32k": rss,
    }

    print(f"`{PRESET}` preset, fp32 CPU, {results['machine']}, {results['threads']} threads;")
    print(
        f"peak {peak / 1e9:.1f} GFLOP/s (fp32 matmul); load average {load_before[0]:.1f} -> "
        f"{results['load_average_after']:.1f}\n"
    )
    print("| seq_len x windows | loop tok/s | bare tok/s | loop MFU | bare MFU | loop overhead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for s in speed:
        print(
            f"| {s['seq_len']} x {s['windows_per_step']} | {s['loop_tokens_per_s']:,.0f} | "
            f"{s['bare_tokens_per_s']:,.0f} | {100 * s['loop_mfu']:.1f}% | {100 * s['bare_mfu']:.1f}% | "
            f"{100 * s['loop_overhead']:+.1f}% |"
        )
    print("\n| 32k, 1 window | peak RSS | step's own (peak - before) | train() time |")
    print("| --- | ---: | ---: | ---: |")
    for name in ("plain", "checkpointing"):
        r = rss[name]
        print(
            f"| {name} | {r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['step_bytes'] / 2**20:,.0f} MiB | "
            f"{r['s']:.1f} s |"
        )
    print(f"| ratio | {rss['peak_ratio']:.2f} | {rss['step_ratio']:.2f} | |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
