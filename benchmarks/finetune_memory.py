"""LoRA on evo2-1b: the memory estimate `evo2 finetune` prints, against the peak RSS of one LoRA step on CPU.

Writes random weights in the evo2-1b Vortex layout (bf16 like the released files, fp32 poles and residues)
beside their release YAML, and a small dataset from the Y. pestis sample; then, in a fresh process, runs the
code path of `evo2 finetune --method lora` (Vortex import -> LoRA -> the training loop) for one step and
reads the process's memory from /proc/self/status:

    baseline     VmRSS after importing torch and evo2_cli
    load peak    VmHWM while reading the .pt, converting it and adding the adapters
    loaded       VmRSS once the adapted model is ready (and RssFile: the .pt's pages still mapped)
    first step   VmHWM over the loop's step-0 checkpoint write and step 1 (reset after loading)
    step peak    VmHWM over step 2 alone: one LoRA step (reset after step 1)
    save peak    VmHWM over the final checkpoint write (reset after step 2)

and the checkpoints: the size of the loop's final checkpoint directory (adapters, optimizer state, base
reference), then the model files written both ways, timed (`write_model_files` into a fresh directory: the
tensors, config.yaml, the sha256 of each): adapters only with the base reference (what finetune writes) and
every tensor in fp32 (what it wrote before), and the time `load_finetuned` takes to rebuild each.

    flock /tmp/evo2-bench.lock .venv/bin/python benchmarks/finetune_memory.py [--seq-len 256]
        [--micro-batch 1] [--workdir DIR] [--keep]

Needs about 3 GiB of disk (the .pt) plus 4.5 GiB (the full-weight checkpoint written for comparison), and
about 11 GiB of RAM at seq_len 256 (the adapted model and one rebuilt from a checkpoint at once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "yersinia_pestis_pPCP1_NC_005816.fa"
GIB = 1024**3


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def write_inputs(workdir: Path) -> None:
    """Random evo2-1b weights in the Vortex layout + release YAML, and a train/val dataset."""
    import numpy as np
    import torch

    from evo2_cli.data.fasta import read_fasta
    from evo2_cli.data.indexed import IndexedDatasetWriter
    from evo2_cli.model import preset_config
    from evo2_cli.model.vortex import release_yaml, vortex_expected_shapes

    config = preset_config("evo2-1b")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in vortex_expected_shapes(config).items():
        if key.endswith("log_poles"):  # decay rates spread over 1e-4..1, as in trained checkpoints
            tensors[key] = -torch.exp(torch.empty(shape).uniform_(-9.2, 0.0, generator=generator))
        elif key.endswith("inv_freq"):
            head_dim = config.hidden_size // config.num_attention_heads
            steps = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            tensors[key] = 1.0 / (config.rotary_emb_base**steps)
        elif key.endswith("scale"):
            tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            value = torch.randn(shape, generator=generator) * 0.02
            tensors[key] = value if key.endswith("residues") else value.to(torch.bfloat16)
    torch.save(tensors, workdir / "evo2-1b.pt")
    (workdir / "evo2-1b.yml").write_text(release_yaml(config))
    del tensors
    tokens = np.frombuffer(next(iter(read_fasta(SAMPLE))).sequence, dtype=np.uint8)
    cut = int(len(tokens) * 0.8)
    for split, part in (("train", tokens[:cut]), ("val", tokens[cut:])):
        with IndexedDatasetWriter(workdir / f"yp_{split}") as writer:
            writer.add_document(np.concatenate([part, [0]]).astype(np.uint8))


def child(workdir: Path, seq_len: int, micro_batch: int) -> dict:
    """One LoRA step through prepare + the training loop; memory figures and the printed estimate."""
    import io

    from rich.console import Console

    from evo2_cli.config import build_config
    from evo2_cli.finetune import FinetuneJob, prepare
    from evo2_cli.finetune.run import train_prepared
    from evo2_cli.train.loop import TrainHooks

    figures = {"baseline": proc_status("VmRSS")}
    job = build_config(
        FinetuneJob,
        {
            "data": {"datasets": [{"path": str(workdir / "yp")}], "seq_len": seq_len, "val_windows": 0},
            "optim": {"lr": 1e-4, "warmup_steps": 1, "global_batch": micro_batch},
            "train": {
                "run_dir": str(workdir / "run"),
                "max_steps": 2,
                "micro_batch": micro_batch,
                "eval_interval": 0,
                "device": "cpu",
                "peak_flops": 1e11,  # skip the CPU matmul measurement
            },
            "finetune": {"init_from": str(workdir / "evo2-1b.pt"), "method": "lora"},
        },
    )
    printed = io.StringIO()
    started = time.perf_counter()
    prepared = prepare(job, console=Console(file=printed, width=400))
    figures["load_s"] = time.perf_counter() - started
    figures["load_peak"], figures["loaded"] = proc_status("VmHWM"), proc_status("VmRSS")
    figures["loaded_file"] = proc_status("RssFile")  # pages of the memory-mapped .pt still resident
    reset_peak()

    def after_step(info) -> None:
        nonlocal started
        if info.step == 0:  # (steps done before this one) the loop's step-0 checkpoint write + step 1
            figures["first_step_peak"] = proc_status("VmHWM")
            reset_peak()
            started = time.perf_counter()
            return
        figures["step_peak"] = proc_status("VmHWM")
        figures["step_s"] = time.perf_counter() - started
        figures["loss"] = info.loss
        reset_peak()

    result = train_prepared(
        prepared, hooks=TrainHooks(after_step=after_step), console=Console(file=io.StringIO())
    )
    figures["save_peak"] = proc_status("VmHWM")
    figures["checkpoint_files"] = {p.name: p.stat().st_size for p in result.checkpoint.iterdir()}
    figures.update(compare_checkpoints(workdir, prepared))
    estimate = prepared.estimate
    figures["estimate"] = {
        "weights": estimate.weight_bytes,
        "gradients": estimate.gradient_bytes,
        "optimizer": estimate.optimizer_bytes,
        "activations": estimate.activation_bytes,
        "total": estimate.total_bytes,
        "trainable": estimate.trainable,
        "parameters": estimate.parameters,
    }
    figures["printed"] = printed.getvalue().strip()
    return figures


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def compare_checkpoints(workdir: Path, prepared) -> dict:
    """The model files of the adapted model written as finetune writes them now (trained tensors + base
    reference) and as it did before (every tensor, fp32): bytes and seconds, then `load_finetuned` of each."""
    import gc

    import torch

    from evo2_cli.finetune import load_finetuned
    from evo2_cli.model.checkpoint import write_model_files

    figures = {}
    writers = {
        "adapters": prepared.write_model_files,
        "full": lambda model, directory, **kw: write_model_files(model, directory, dtype=torch.float32, **kw),
    }
    for name, write in writers.items():
        directory = workdir / f"ckpt-{name}"
        directory.mkdir()
        started = time.perf_counter()
        write(prepared.model, directory, config=prepared.job)
        figures[f"{name}_save_s"] = time.perf_counter() - started
        figures[f"{name}_bytes"] = directory_bytes(directory)
    prepared.model = None
    gc.collect()
    for name in writers:
        started = time.perf_counter()
        model = load_finetuned(workdir / f"ckpt-{name}")
        figures[f"{name}_load_s"] = time.perf_counter() - started
        del model
        gc.collect()
        shutil.rmtree(workdir / f"ckpt-{name}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.workdir, args.seq_len, args.micro_batch)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="evo2-ft-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        write_inputs(workdir)
        write_s = time.perf_counter() - started
        command = [sys.executable, __file__, "--child", "--workdir", str(workdir)]
        command += ["--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)]
        done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    est, base = figures["estimate"], figures["baseline"]
    print(f"LoRA on evo2-1b, CPU fp32, micro_batch {args.micro_batch} x seq_len {args.seq_len}")
    timing = f"load {figures['load_s']:.0f} s, step 2 {figures['step_s']:.0f} s"
    print(f"(random weights written in {write_s:.0f} s; {timing})")
    print(figures["printed"])
    print()
    print("| quantity | GiB |")
    print("| --- | --- |")
    rows = [
        ("estimate: weights", est["weights"]),
        ("estimate: adapters' gradients + AdamW state", est["gradients"] + est["optimizer"]),
        ("estimate: activations", est["activations"]),
        ("estimate: total", est["total"]),
        ("measured: baseline RSS (python + torch + evo2_cli)", base),
        ("measured: peak RSS while loading", figures["load_peak"]),
        ("measured: RSS once loaded", figures["loaded"]),
        ("measured: of which file-backed (the .pt's mapped pages)", figures["loaded_file"]),
        ("measured: peak RSS, step-0 checkpoint write + step 1", figures["first_step_peak"]),
        ("measured: peak RSS through step 2 alone (one LoRA step)", figures["step_peak"]),
        ("measured: step-2 peak - baseline (compare with the total)", figures["step_peak"] - base),
        ("measured: peak RSS while writing the final checkpoint", figures["save_peak"]),
    ]
    for label, value in rows:
        print(f"| {label} | {value / GIB:.2f} |")
    print()
    files = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in figures["checkpoint_files"].items())
    print(f"the loop's final checkpoint: {files}")
    print("| model files | size | write (tensors + config + sha256) | load_finetuned |")
    print("| --- | --- | --- | --- |")
    for name, label in (("full", "every tensor, fp32 (before)"), ("adapters", "adapters + base reference")):
        size = figures[f"{name}_bytes"]
        shown = f"{size / GIB:.2f} GiB" if size > GIB else f"{size / 2**20:.2f} MiB"
        save, load = figures[f"{name}_save_s"], figures[f"{name}_load_s"]
        print(f"| {label} | {shown} | {save:.1f} s | {load:.1f} s |")
    print()
    print(json.dumps({"seq_len": args.seq_len, "micro_batch": args.micro_batch, **figures}, indent=None))


if __name__ == "__main__":
    main()
