"""One-call GPU check: everything evo2-cli does on CUDA, in under 10 minutes on one H200.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine
    python benchmarks/gpu_check.py --out DIR --dry-run  # CPU, tiny sizes, seconds (tests/test_gpu_check.py)

Phases, in order, each under its own time budget (seconds, `--budget PHASE=S` to change one):

    gpu_tests       150  `pytest -m gpu`: every CUDA test of the suite (on a GPU, a skipped one is a failure)
    train_small      30  bf16 training steps of the `small` preset at 8k tokens: tokens/s, MFU, peak memory
    train_1b        120  the same, evo2-1b-shaped (random weights, one 8k window per step, FSDP2 off)
    decode           90  cached decoding, evo2-1b-shaped in bf16: ms/token after a 1k and a 16k prompt
    long_context    120  exact long-context scoring (chunked prefill, `StripedHyena.prefill_chunks`): chunked
                         against the full forward on `small` in fp32 at 16k, then a 128k-token score of the
                         evo2-1b-shaped model in bf16 (seconds, tokens/s, peak memory). Without
                         `prefill_chunks` in this checkout the row says "not available" (not a failure).

Every phase runs even when an earlier one failed; any error or overrun is printed with its phase and
traceback, and the script exits 1 naming the failed phases. DIR receives gpu_check.json (every figure, the
machine, the status of each phase) and gpu_check.md (the table for BENCHMARKS.md).

MFU = 3 x `estimate_flops` (FFT convolutions counted) x windows/s over the device's dense bf16 peak (the
training loop's own `peak_flops`: a datasheet figure on known GPUs, matmul probes on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evo2_cli.fsio import atomic_write_text  # noqa: E402
from evo2_cli.infer.loading import prepare_for_inference  # noqa: E402
from evo2_cli.model import StripedHyena, estimate_flops, preset_config  # noqa: E402
from evo2_cli.runtime import Runtime  # noqa: E402
from evo2_cli.train.config import OptimSection  # noqa: E402
from evo2_cli.train.data import Batch  # noqa: E402
from evo2_cli.train.metrics import peak_flops  # noqa: E402
from evo2_cli.train.optim import build_optimizer  # noqa: E402
from evo2_cli.train.step import backward_global_batch  # noqa: E402

SEED = 0
BASES = torch.tensor(list(b"ACGT"))


@dataclass(frozen=True)
class Sizes:
    device: str
    gpu_tests: tuple[str, ...]  # pytest paths
    small: str  # preset standing for `small`
    big: str  # preset standing for the evo2-1b-shaped model
    train_seq_len: int
    train_steps: int  # timed, after `warmup_steps`
    warmup_steps: int
    decode_contexts: tuple[int, ...]
    decode_tokens: int
    exact_len: int  # chunked vs full forward
    long_len: int
    chunk: int
    exact_tolerance: float  # max |log p| difference, fp32


FULL = Sizes(
    device="cuda",
    gpu_tests=("tests",),
    small="small",
    big="evo2-1b",
    train_seq_len=8192,
    train_steps=6,
    warmup_steps=2,
    decode_contexts=(1024, 16384),
    decode_tokens=64,
    exact_len=16384,
    long_len=131072,
    chunk=8192,
    exact_tolerance=1e-3,
)
DRY = Sizes(
    device="cpu",
    gpu_tests=("tests/test_train.py",),  # collects and skips its gpu test: the phase's machinery runs
    small="test",
    big="test",
    train_seq_len=128,
    train_steps=2,
    warmup_steps=1,
    decode_contexts=(32, 128),
    decode_tokens=3,
    exact_len=128,
    long_len=256,
    chunk=64,
    exact_tolerance=1e-3,
)
BUDGETS = {"gpu_tests": 150.0, "train_small": 30.0, "train_1b": 120.0, "decode": 90.0, "long_context": 120.0}


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise PhaseTimeout in this (main) thread after `seconds` of wall time."""

    def expire(signum, frame):
        raise PhaseTimeout(f"over its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def say(text: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, GiB; None on a CPU (not measured there)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def random_ids(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)  # the global RNG stays as it was
    return BASES[torch.randint(0, 4, (1, length), generator=generator)]  # (1, L)


def build(preset: str) -> StripedHyena:
    torch.manual_seed(SEED)
    return StripedHyena(preset_config(preset))  # on the CPU first, as `evo2 train` builds it


# ---------------------------------------------------------------- phases


def gpu_tests(sizes: Sizes, device: torch.device, budget: float, work: Path) -> dict:
    report = work / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={report}", *sizes.gpu_tests]
    say("  " + " ".join(command[1:]))
    done = subprocess.run(command, cwd=ROOT, timeout=budget, capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="", flush=True)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    if done.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exited {done.returncode}: {counts}")
    if device.type == "cuda" and counts["skipped"]:
        raise RuntimeError(f"{counts['skipped']} gpu test(s) skipped on a CUDA machine: {counts}")
    if counts["tests"] == 0:
        raise RuntimeError("pytest -m gpu collected no test")
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}


def train_steps(preset: str, sizes: Sizes, device: torch.device) -> dict:
    """The training loop's own step (backward_global_batch, clipping, AdamW) on one random 8k window."""
    start = time.perf_counter()
    model = build(preset).to(device)
    model.train()
    build_s = time.perf_counter() - start
    bf16 = device.type == "cuda"
    runtime = Runtime(device, autocast_dtype=torch.bfloat16 if bf16 else None)
    optimizer = build_optimizer(model, OptimSection())
    params = [p for p in model.parameters() if p.requires_grad]
    ids = random_ids(sizes.train_seq_len + 1, SEED)
    batch = Batch(
        input_ids=ids[:, :-1],
        labels=ids[:, 1:],
        loss_weights=torch.ones(1, sizes.train_seq_len),
        counts_as_base=torch.ones(1, sizes.train_seq_len, dtype=torch.bool),
    ).to(device)
    reset_peak_memory(device)
    times, losses = [], []
    for step in range(sizes.warmup_steps + sizes.train_steps):
        synchronize(device)
        began = time.perf_counter()
        sums = backward_global_batch(model, [batch], runtime)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(sums[0].item())  # synchronizes
        times.append(time.perf_counter() - began)
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{preset}: non-finite loss {losses[-1]} at step {step}")
        say(f"  {preset} step {step}: loss {losses[-1]:.4f}, {times[-1]:.3f} s")
    step_s = statistics.median(times[sizes.warmup_steps :])
    peak = peak_flops(device, bf16, 0.0)
    flops_per_step = 3 * estimate_flops(model.config, sizes.train_seq_len)
    result = {
        "preset": preset,
        "parameters": model.num_parameters(),
        "precision": "bf16 autocast, fp32 weights" if bf16 else "fp32",
        "seq_len": sizes.train_seq_len,
        "timed_steps": sizes.train_steps,
        "build_s": build_s,
        "step_s": step_s,
        "tokens_per_s": sizes.train_seq_len / step_s,
        "mfu": flops_per_step / step_s / peak.flops,
        "peak_flops": peak.flops,
        "peak_flops_source": peak.source,
        "peak_memory_gib": peak_memory_gib(device),
        "losses": losses,
    }
    del model, optimizer, params, batch
    reset_peak_memory(device)
    return result


_inference_models: dict[tuple[str, str], StripedHyena] = {}  # built once, shared by decode and long_context


def inference_model(preset: str, device: torch.device, dtype: torch.dtype) -> StripedHyena:
    key = (preset, str(dtype))
    if key not in _inference_models:
        _inference_models[key] = prepare_for_inference(build(preset), device, dtype)
    return _inference_models[key]


def inference_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # `evo2 infer --dtype auto`


@torch.no_grad()
def decode(sizes: Sizes, device: torch.device) -> dict:
    model = inference_model(sizes.big, device, inference_dtype(device))
    rows = []
    for context in sizes.decode_contexts:
        reset_peak_memory(device)
        cache = model.new_cache(1)
        synchronize(device)
        began = time.perf_counter()
        token = model.prefill(random_ids(context, context).to(device), cache)[:, -1].argmax(-1)
        synchronize(device)
        prefill_s = time.perf_counter() - began
        token = model.step(token, cache).argmax(-1)  # warm-up, not timed
        times = []
        for _ in range(sizes.decode_tokens):
            synchronize(device)
            began = time.perf_counter()
            token = model.step(token, cache).argmax(-1)
            synchronize(device)
            times.append(time.perf_counter() - began)
        ms = 1e3 * statistics.median(times)
        say(f"  {sizes.big} context {context}: prefill {prefill_s:.2f} s, {ms:.2f} ms/token")
        rows.append(
            {
                "context": context,
                "prefill_s": prefill_s,
                "ms_per_token": ms,
                "tokens": sizes.decode_tokens,
                "peak_memory_gib": peak_memory_gib(device),
            }
        )
        del cache
    return {"preset": sizes.big, "dtype": str(inference_dtype(device)), "contexts": rows}


def chunked_log_probs(model: StripedHyena, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every t, fp32, through prefill_chunks: (1, L) -> (L - 1,)."""
    pieces, start = [], 0
    for logits, _ in model.prefill_chunks(ids, model.new_cache(1), chunk_size=chunk):  # (1, C, V)
        length = logits.shape[1]
        targets = ids[0, start + 1 : start + 1 + length]  # the next tokens: one fewer after the last chunk
        log_p = torch.log_softmax(logits[0, : len(targets)].float(), dim=-1)  # (C, V)
        pieces.append(log_p.gather(-1, targets[:, None])[:, 0])  # (C,)
        start += length
    return torch.cat(pieces)


@torch.no_grad()
def long_context(sizes: Sizes, device: torch.device) -> dict:
    if not hasattr(StripedHyena, "prefill_chunks"):
        say("  StripedHyena.prefill_chunks is not in this checkout: not available")
        return {"status": "not available", "reason": "StripedHyena.prefill_chunks missing (issue 14)"}
    # Exactness: chunked against the full forward, fp32, `small`.
    small = inference_model(sizes.small, device, torch.float32)
    ids = random_ids(sizes.exact_len, 1).to(device)
    full = torch.log_softmax(small(ids)[0].float(), dim=-1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    chunked = chunked_log_probs(small, ids, sizes.chunk)
    difference = (full - chunked).abs().max().item()
    say(f"  {sizes.small} fp32 at {sizes.exact_len}: chunked vs full forward, max |d log p| {difference:.2e}")
    if not difference <= sizes.exact_tolerance:
        raise RuntimeError(
            f"chunked prefill differs from the full forward by {difference:.3g} > {sizes.exact_tolerance}"
        )
    # The long score.
    dtype = inference_dtype(device)
    model = inference_model(sizes.big, device, dtype)
    ids = random_ids(sizes.long_len, 2).to(device)
    reset_peak_memory(device)
    synchronize(device)
    began = time.perf_counter()
    log_probs = chunked_log_probs(model, ids, sizes.chunk)
    synchronize(device)
    seconds = time.perf_counter() - began
    mean = log_probs.double().mean().item()
    if not math.isfinite(mean):
        raise RuntimeError(f"non-finite score {mean} over {sizes.long_len} tokens")
    say(f"  {sizes.big} {dtype} at {sizes.long_len}: {seconds:.2f} s, mean log p {mean:.4f}")
    return {
        "status": "ok",
        "exact_check": {
            "preset": sizes.small,
            "length": sizes.exact_len,
            "max_abs_log_p_difference": difference,
        },
        "preset": sizes.big,
        "dtype": str(dtype),
        "length": sizes.long_len,
        "chunk": sizes.chunk,
        "seconds": seconds,
        "tokens_per_s": sizes.long_len / seconds,
        "mean_log_p": mean,
        "peak_memory_gib": peak_memory_gib(device),
    }


# ---------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device": device.type,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found.update(
            gpu=properties.name,
            gpu_memory_gib=properties.total_memory / 2**30,
            cuda=torch.version.cuda,
        )
    return found


def number(value: float | None, digits: str) -> str:
    return "n/a" if value is None else format(value, digits)


def table(results: dict) -> str:
    lines = ["| phase | status | seconds | figures |", "| --- | --- | ---: | --- |"]
    for name, phase in results["phases"].items():
        figures = ""
        data = phase.get("result") or {}
        if name == "gpu_tests" and data:
            figures = f"{data['passed']} passed, {data['skipped']} skipped of {data['tests']}"
        elif name.startswith("train") and data:
            figures = (
                f"{data['preset']} ({data['parameters']:,} parameters) at {data['seq_len']}: "
                f"{data['tokens_per_s']:,.0f} tok/s, MFU {100 * data['mfu']:.1f}%, "
                f"peak {number(data['peak_memory_gib'], '.1f')} GiB"
            )
        elif name == "decode" and data:
            figures = "; ".join(
                f"{row['context']}: {row['ms_per_token']:.2f} ms/token" for row in data["contexts"]
            )
        elif name == "long_context" and data.get("status") == "ok":
            figures = (
                f"{data['preset']} {data['length']:,} tokens: {data['tokens_per_s']:,.0f} tok/s, peak "
                f"{number(data['peak_memory_gib'], '.1f')} GiB; chunked vs full max |d log p| "
                f"{data['exact_check']['max_abs_log_p_difference']:.1e}"
            )
        elif name == "long_context" and data:
            figures = data["reason"]
        if phase["status"] != "ok":
            figures = phase.get("error", figures)
        lines.append(f"| {name} | {phase['status']} | {phase['seconds']:.1f} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="PHASE=S", help="override one phase's time budget"
    )
    args = parser.parse_args(argv)
    budgets = dict(BUDGETS)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets:
            parser.error(f"--budget {item}: unknown phase {name!r}; phases: {', '.join(budgets)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            parser.error(f"--budget {item}: expected PHASE=SECONDS")
    sizes = DRY if args.dry_run else FULL
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run with --dry-run for the CPU check of this script",
            file=sys.stderr,
        )
        return 2
    device = torch.device(sizes.device)
    args.out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, Callable[[], dict]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        phases = {
            "gpu_tests": lambda: gpu_tests(sizes, device, budgets["gpu_tests"], Path(tmp)),
            "train_small": lambda: train_steps(sizes.small, sizes, device),
            "train_1b": lambda: train_steps(sizes.big, sizes, device),
            "decode": lambda: decode(sizes, device),
            "long_context": lambda: long_context(sizes, device),
        }
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "dry_run": args.dry_run,
            "machine": machine(device),
            "budgets_s": budgets,
            "phases": {},
        }
        failed = []
        began_all = time.perf_counter()
        for name, run in phases.items():
            say(f"phase {name} (budget {budgets[name]:g} s)")
            began = time.perf_counter()
            record: dict = {}
            try:
                with time_limit(budgets[name]):
                    record["result"] = run()
                record["status"] = "ok"
            except Exception as error:  # every failure is reported, then the next phase runs
                traceback.print_exc()
                timed_out = isinstance(error, (PhaseTimeout, subprocess.TimeoutExpired))
                record["status"] = "timeout" if timed_out else "error"
                record["error"] = f"{type(error).__name__}: {error}"
                failed.append(name)
                say(f"phase {name} FAILED: {record['error']}")
            record["seconds"] = time.perf_counter() - began
            results["phases"][name] = record
            say(f"phase {name}: {record['status']} in {record['seconds']:.1f} s")
        results["total_s"] = time.perf_counter() - began_all
    atomic_write_text(args.out / "gpu_check.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "gpu_check.md", table(results))
    print(table(results), flush=True)
    say(f"total {results['total_s']:.0f} s; wrote {args.out / 'gpu_check.json'} and gpu_check.md")
    if failed:
        print(f"gpu_check FAILED in phase(s): {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
