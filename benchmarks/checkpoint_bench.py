"""The cost of verifying a checkpoint: `load_model` of evo2-1b with and without the sha256 check.

Writes random fp32 weights in the evo2-1b layout as one of our checkpoint directories (`save_model`: 4.4 GB
of model.safetensors, meta.json with the files' sha256), then times, each in a fresh process and the best
of --repeat runs, with the file in the page cache (it was just written; a cold read adds the disk's time
to every row alike):

    unverified          load_model(dir, verify=False): safetensors maps the file, check_tensors reads every
                        value (finite), the model is assembled
    verified            load_model(dir): the same, the sha256 computed in a second thread meanwhile
    sha256 alone        fsio.sha256_file(model.safetensors): the floor of any verification
    sha256, then load   the check done first, then the unverified load: what the second thread saves

Peak RSS is the process's VmHWM (torch and evo2_cli imported: ~0.3 GiB). The timer starts after a one-off
cost of any process that builds a model (~4 s of torch start-up on the first meta-device model here).

    flock /tmp/evo2-bench.lock .venv/bin/python benchmarks/checkpoint_bench.py [--repeat 3]
        [--preset evo2-1b] [--workdir DIR] [--keep]

Needs 4.4 GB of disk and about 9 GiB of RAM while writing (the random weights, then the file), 4.5 GiB
while loading.
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

import bench_machine

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
MODES = ("unverified", "verified", "sha256 alone", "sha256, then load")


def write_checkpoint(directory: Path, preset: str) -> int:
    """Random weights (normal, std 0.02: finite, as the load checks) of `preset`; returns the parameters."""
    import torch

    from evo2_cli.model import preset_config, save_model
    from evo2_cli.model.checkpoint import build_model, expected_shapes

    config = preset_config(preset)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.empty(shape).normal_(0, 0.02, generator=generator)
        for name, shape in expected_shapes(config).items()
    }
    model = build_model(config, tensors)
    save_model(model, directory)
    return model.num_parameters()


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(directory: Path, mode: str) -> dict:
    from evo2_cli.fsio import sha256_file
    from evo2_cli.model import preset_config
    from evo2_cli.model.checkpoint import (
        WEIGHTS_FILE,
        check_file,
        expected_shapes,
        load_model,
        recorded_hashes,
    )

    expected_shapes(preset_config("test"))  # torch's one-off start-up (~4 s here), the same for every mode
    started = time.perf_counter()
    if mode == "unverified":
        load_model(directory, verify=False)
    elif mode == "verified":
        load_model(directory)
    elif mode == "sha256 alone":
        sha256_file(directory / WEIGHTS_FILE)
    else:
        check_file(directory / WEIGHTS_FILE, recorded_hashes(directory))
        load_model(directory, verify=False)
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; the fastest is reported")
    parser.add_argument("--preset", default="evo2-1b")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.workdir, args.child)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="evo2-ckpt-bench-"))
    directory = workdir / "ckpt"
    try:
        started = time.perf_counter()
        parameters = write_checkpoint(directory, args.preset)
        write_s = time.perf_counter() - started
        size = (directory / "model.safetensors").stat().st_size
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeat):  # modes interleaved: a busy spell of the machine hits them alike
            for mode in MODES:
                command = [sys.executable, __file__, "--child", mode, "--workdir", str(directory)]
                done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    best = {mode: min(found, key=lambda r: r["seconds"]) for mode, found in runs.items()}
    base = best["unverified"]["seconds"]
    print(
        f"{args.preset}: {parameters:,} parameters, model.safetensors {size / 1e9:.2f} GB fp32 "
        f"(written in {write_s:.0f} s); best of {args.repeat}, page cache warm"
    )
    print()
    print("| load | seconds | vs unverified | GB/s | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- |")
    for mode in MODES:
        seconds = best[mode]["seconds"]
        print(
            f"| {mode} | {seconds:.2f} | {seconds - base:+.2f} s | {size / 1e9 / seconds:.2f} | "
            f"{best[mode]['peak_rss'] / GIB:.2f} |"
        )
    print()
    figures = {
        "preset": args.preset,
        "parameters": parameters,
        "bytes": size,
        "repeat": args.repeat,
        "best": best,
        "runs": runs,
        "machine": bench_machine.describe(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
