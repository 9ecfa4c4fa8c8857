"""Long-context inference benchmark (one run, table + JSON): exact chunked scoring against the one-shot
forward and the windowed mode, its peak memory, and the analytic memory of the release models.

    .venv/bin/python benchmarks/long_context.py [--lengths 16384 65536 262144 1048576] [--chunk 8192]
        [--device cpu|cuda] [--evo2-1b-length 131072] [--json OUT.json]

- Measured rows (random weights, `small` preset shapes): `evo2 infer score`'s core path on one random
  record of L tokens, three ways: exact (chunked prefill, --chunk), windows (--window, overlap window/4)
  and one forward over the whole record (`--oneshot-max`: longer ones are skipped, their activations grow
  with L). Two models: `small` with its attention layers (SDH*SDH*) and without (SDHSDHSD, every
  attention layer dropped). Each row runs in its own subprocess so its peak RSS (VmHWM; CUDA:
  max_memory_allocated) is its own; `base` is the RSS after the model is built and warmed up, `growth`
  the peak minus it, beside memory.py's estimate of KV cache + chunk activations.
  Exact scoring with attention costs O(L^2) (every position attends to all before it); `--attention-max`
  skips longer exact rows with attention (on 2 CPU cores 256k tokens would take hours).
- An evo2-1b-shaped model (random weights, fp32) scoring `--evo2-1b-length` tokens exactly, timed.
- The analytic memory of evo2-7b and evo2-40b on one GPU (bf16 weights with fp32 hyena filters, bf16 KV
  cache, one chunk's activations) at 128k, 262k and 1M tokens, beside Vortex's hcl filter buffer (the
  (D, S, L) fp32 intermediate of its filter, D x S x L x 4 bytes: 17 GB at 64k, 34 GB at 131k, 262 GB at
  1M for the 7B, Zymrael/vortex#76).
Goals (issue 14): without attention, peak memory at 1M within 1.2x of 64k; with attention, growth only by
the KV cache (within 10% of the analytic bytes); exact throughput >= 0.8x the windowed mode's at 64k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_machine import describe

WITH_ATTENTION, WITHOUT_ATTENTION = "SDH*SDH*", "SDHSDHSD"
GB, GIB, MIB = 10**9, 1024**3, 1024**2


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_row(row: dict) -> dict:
    """One measured row, in this (child) process: build, warm up, score, report."""
    import numpy as np
    import torch

    from evo2_cli.infer.config import Context
    from evo2_cli.infer.memory import estimate_inference_memory
    from evo2_cli.infer.scoring import score_reference, score_sequences
    from evo2_cli.infer.sequences import Sequence
    from evo2_cli.model import StripedHyena, preset_config

    torch.set_num_threads(row["threads"])
    torch.manual_seed(0)
    overrides = {"layout": row["layout"]} if row["layout"] else {}
    device = torch.device(row["device"])
    model = StripedHyena(preset_config(row["preset"], **overrides)).to(device).eval().requires_grad_(False)
    tokens = np.random.default_rng(1).choice(np.frombuffer(b"ACGT", np.uint8), row["length"])
    context = Context(
        row["mode"] if row["mode"] != "oneshot" else "exact",
        chunk=row["chunk"],
        window=row["window"],
        overlap=row["window"] // 4,
    )

    def score(part):
        if row["mode"] == "oneshot":
            return float(np.sum(score_reference(model, part)[1:], dtype=np.float64))
        return next(score_sequences(model, [Sequence("x", part)], context, keep_logprobs=False)).sum_ll

    score(tokens[:64])  # warm-up: kernels, allocator
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    sum_ll = score(tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    estimate = estimate_inference_memory(model, row["length"], row["chunk"])
    return {
        **row,
        "parameters": model.num_parameters(),
        "seconds": seconds,
        "tokens_per_s": row["length"] / seconds,
        "base_bytes": base,
        "peak_bytes": peak,
        "growth_bytes": peak - base,
        "estimate_kv_bytes": estimate.kv_cache_bytes,
        "estimate_activation_bytes": estimate.activation_bytes,
        "sum_ll": sum_ll,
    }


def measure(row: dict) -> dict:
    """`run_row` in a fresh subprocess (a clean peak RSS per row)."""
    command = [sys.executable, __file__, "--child", json.dumps(row)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def analytic_rows(chunk: int) -> list[dict]:
    """Memory of evo2-7b / evo2-40b exact inference on one GPU, from memory.py on a meta-device model."""
    import torch

    from evo2_cli.infer.memory import estimate_inference_memory
    from evo2_cli.model import StripedHyena, preset_config
    from evo2_cli.model.model import is_filter_parameter

    rows = []
    for preset in ("evo2-7b", "evo2-40b"):
        config = preset_config(preset)
        with torch.device("meta"):
            model = StripedHyena(config)
        for name, parameter in model.named_parameters():
            if not is_filter_parameter(name):  # as load_inference_model with --dtype bf16
                parameter.data = parameter.data.to(torch.bfloat16)
        for length in (131072, 262144, 1048576):
            e = estimate_inference_memory(model, length, chunk)
            rows.append(
                {
                    "model": preset,
                    "length": length,
                    "chunk": chunk,
                    "weights_bytes": e.weight_bytes,
                    "kv_cache_bytes": e.kv_cache_bytes,
                    "activation_bytes": e.activation_bytes,
                    "total_bytes": e.total_bytes,
                    "vortex_hcl_filter_buffer_bytes": config.hidden_size * config.state_size * length * 4,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--oneshot-max", type=int, default=65536, help="longest one-shot forward row")
    parser.add_argument("--attention-max", type=int, default=65536, help="longest exact row with attention")
    parser.add_argument("--modes", nargs="+", default=["exact", "windows", "oneshot"])
    parser.add_argument("--layouts", nargs="+", default=[WITHOUT_ATTENTION, WITH_ATTENTION])
    parser.add_argument("--evo2-1b-length", type=int, default=131072, help="0 skips the evo2-1b row")
    parser.add_argument("--evo2-1b-chunk", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_row(json.loads(args.child))))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    load_at_start = os.getloadavg()[0]  # other processes on the cores skew every figure
    common = {"preset": "small", "chunk": args.chunk, "window": args.window}
    common.update(device=args.device, threads=args.threads)
    measured = []
    for length in args.lengths:
        for layout in args.layouts:
            for mode in args.modes:
                if mode == "oneshot" and length > args.oneshot_max:
                    continue
                if mode == "exact" and layout == WITH_ATTENTION and length > args.attention_max:
                    continue
                row = measure({**common, "layout": layout, "mode": mode, "length": length})
                console.print(json.dumps(row), highlight=False)
                measured.append(row)
    evo2_1b = None
    if args.evo2_1b_length:
        row = {**common, "preset": "evo2-1b", "layout": None, "mode": "exact", "chunk": args.evo2_1b_chunk}
        evo2_1b = measure({**row, "length": args.evo2_1b_length})
        console.print(json.dumps(evo2_1b), highlight=False)
    analytic = analytic_rows(args.chunk)

    def find(layout, mode, length):
        return next(
            (
                r
                for r in measured
                if (r["layout"], r["mode"], r["length"]) == (layout, mode, length) and "error" not in r
            ),
            None,
        )

    goals = {}
    lengths = sorted(args.lengths)
    low, high = find(WITHOUT_ATTENTION, "exact", 65536), find(WITHOUT_ATTENTION, "exact", lengths[-1])
    if low and high and high is not low:
        goals["no_attention_peak_ratio"] = {
            "lengths": [65536, lengths[-1]],
            "ratio": high["peak_bytes"] / low["peak_bytes"],
            "goal": "<= 1.2 (at 1M vs 64k)",
        }
    attention = [find(WITH_ATTENTION, "exact", n) for n in lengths]
    attention = [r for r in attention if r]
    if len(attention) >= 2:
        first, last = attention[0], attention[-1]
        kv = last["estimate_kv_bytes"] - first["estimate_kv_bytes"]
        goals["attention_growth_vs_kv"] = {
            "lengths": [first["length"], last["length"]],
            "measured_growth_bytes": last["peak_bytes"] - first["peak_bytes"],
            "analytic_kv_growth_bytes": kv,
            "ratio": (last["peak_bytes"] - first["peak_bytes"]) / kv,
            "goal": "within 10% of 1",
        }
    for layout in (WITH_ATTENTION, WITHOUT_ATTENTION):
        exact, windows = find(layout, "exact", 65536), find(layout, "windows", 65536)
        if exact and windows:
            goals[f"exact_vs_windows_throughput_64k_{layout}"] = {
                "ratio": exact["tokens_per_s"] / windows["tokens_per_s"],
                "goal": ">= 0.8",
            }
    import torch

    result = {
        "machine": {
            **describe(),
            "torch_threads": args.threads,
            "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
            "torch": torch.__version__,
            "device": args.device,
        },
        "measured": measured,
        "evo2_1b": evo2_1b,
        "analytic_one_gpu": analytic,
        "goals": goals,
    }

    threads = f"{args.threads} threads, load average {load_at_start:.1f}"
    table = Table(title=f"exact vs windowed vs one-shot scoring, small preset, {args.device}, {threads}")
    for column in ("model", "L", "mode", "tok/s", "s", "base", "peak", "growth", "est. KV + act."):
        table.add_column(column, justify="right")
    for r in measured:
        name = "with attn" if r["layout"] == WITH_ATTENTION else "no attn"
        if "error" in r:
            table.add_row(name, f"{r['length']:,}", r["mode"], "error: " + r["error"][:40])
            continue
        estimate = r["estimate_kv_bytes"] + r["estimate_activation_bytes"] if r["mode"] == "exact" else None
        table.add_row(
            name,
            f"{r['length']:,}",
            r["mode"],
            f"{r['tokens_per_s']:,.0f}",
            f"{r['seconds']:.1f}",
            f"{r['base_bytes'] / MIB:,.0f} MiB",
            f"{r['peak_bytes'] / MIB:,.0f} MiB",
            f"{r['growth_bytes'] / MIB:,.0f} MiB",
            f"{estimate / MIB:,.0f} MiB" if estimate is not None else "",
        )
    out = Console(width=160)  # whole rows in a log
    out.print(table)
    gpu = Table(title=f"analytic memory on one GPU, exact mode, chunk {args.chunk:,}, bf16")
    for column in ("model", "L", "weights", "KV cache", "chunk act.", "total", "Vortex hcl buffer"):
        gpu.add_column(column, justify="right")
    for r in analytic:
        gpu.add_row(
            r["model"],
            f"{r['length']:,}",
            *(
                f"{r[k] / GIB:,.1f} GiB"
                for k in ("weights_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes")
            ),
            f"{r['vortex_hcl_filter_buffer_bytes'] / GB:,.0f} GB",
        )
    out.print(gpu)
    if evo2_1b is not None and "error" not in evo2_1b:
        out.print(
            f"evo2-1b shape, {evo2_1b['length']:,} tokens exact in chunks of {evo2_1b['chunk']:,}: "
            f"{evo2_1b['seconds']:.0f} s ({evo2_1b['tokens_per_s']:.1f} tok/s), peak "
            f"{evo2_1b['peak_bytes'] / GIB:.2f} GiB"
        )
    out.print(json.dumps(goals, indent=1))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
