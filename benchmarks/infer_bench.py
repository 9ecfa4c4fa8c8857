"""Inference benchmark (one run): cached decoding vs full re-forward per token, and scoring throughput.

    .venv/bin/python benchmarks/infer_bench.py [--preset small] [--contexts 1024 16384] [--json OUT.json]

- generation: a random prompt of C tokens is prefilled, then `--decode-tokens` tokens are decoded with the
  cache (`model.step`); per-token time excludes the prefill. The naive baseline re-runs the full forward over
  the whole sequence for each new token (`--naive-tokens` of them, timed after one warm-up). Each token is
  timed alone and the median is reported (robust to other jobs stalling a few tokens).
- scoring: a synthetic 1 Mbase FASTA (random ACGT records) through `evo2 infer score`'s core path
  (FASTA reader, windows, length-bucketed batches), in bases/s.
Targets (issue 6): cached >= 20x naive at 16k; per-token decode at 16k within 1.5x of 1k.
Random weights (`preset`), fp32 on the CPU, all cores. Prints a rich table and the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_machine import describe


@torch.no_grad()
def bench_generation(model, context: int, decode_tokens: int, naive_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompt = torch.from_numpy(rng.choice(np.frombuffer(b"ACGT", np.uint8), context).astype(np.int64))[None]
    cache = model.new_cache(1)
    start = time.perf_counter()
    logits = model.prefill(prompt, cache)[:, -1]
    prefill_s = time.perf_counter() - start
    token = logits.argmax(-1)
    model.step(token, cache)  # warm-up step, not timed
    cached_times = []
    for _ in range(decode_tokens):
        start = time.perf_counter()
        token = model.step(token, cache).argmax(-1)
        cached_times.append(time.perf_counter() - start)
    ids = prompt
    model(ids)  # warm-up forward at this length
    naive_times = []
    for _ in range(naive_tokens):
        start = time.perf_counter()
        token = model(ids)[:, -1].argmax(-1)
        ids = torch.cat((ids, token[:, None]), dim=1)
        naive_times.append(time.perf_counter() - start)
    # Medians: other jobs on shared cores stall single tokens; a median ignores those bursts on both sides.
    cached_s, naive_s = float(np.median(cached_times)), float(np.median(naive_times))
    return {
        "context": context,
        "prefill_s": prefill_s,
        "cached_ms_per_token": cached_s * 1e3,
        "cached_tokens_per_s": 1 / cached_s,
        "naive_ms_per_token": naive_s * 1e3,
        "naive_tokens_per_s": 1 / naive_s,
        "speedup": naive_s / cached_s,
    }


def bench_scoring(model, bases: int, record: int, window: int, batch_tokens: int, seed: int) -> dict:
    from evo2_cli.infer.config import Context
    from evo2_cli.infer.scoring import score_sequences
    from evo2_cli.infer.sequences import read_sequences

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.fa"
        with open(path, "w") as handle:
            for i in range(0, bases, record):
                seq = rng.choice(np.frombuffer(b"ACGT", np.uint8), min(record, bases - i)).tobytes().decode()
                handle.write(
                    f">r{i // record}\n" + "\n".join(seq[j : j + 80] for j in range(0, len(seq), 80)) + "\n"
                )
        start = time.perf_counter()
        scores = list(
            score_sequences(
                model,
                read_sequences(path),
                Context("windows", window=window, overlap=window // 4, batch_tokens=batch_tokens),
            )
        )
        elapsed = time.perf_counter() - start
    total = sum(s.length for s in scores)
    return {
        "bases": total,
        "records": len(scores),
        "window": window,
        "seconds": elapsed,
        "bases_per_s": total / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--naive-tokens", type=int, default=3)
    parser.add_argument("--score-bases", type=int, default=1_000_000)
    parser.add_argument(
        "--score-record", type=int, default=20_000, help="record length of the synthetic FASTA"
    )
    parser.add_argument("--score-window", type=int, default=8192)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's own]")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from evo2_cli.model import StripedHyena, preset_config

    load_at_start = os.getloadavg()[0]  # other processes on the cores skew every figure
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = StripedHyena(preset_config(args.preset)).eval().requires_grad_(False)
    generation = [
        bench_generation(model, c, args.decode_tokens, args.naive_tokens, args.seed) for c in args.contexts
    ]
    scoring = bench_scoring(
        model, args.score_bases, args.score_record, args.score_window, args.batch_tokens, args.seed
    )
    ratio = generation[-1]["cached_ms_per_token"] / generation[0]["cached_ms_per_token"]
    result = {
        "machine": {
            **describe(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
            "torch": torch.__version__,
        },
        "model": {
            "preset": args.preset,
            "parameters": model.num_parameters(),
            "dtype": "fp32",
            "device": "cpu",
        },
        "generation": generation,
        "decode_ratio_last_vs_first": ratio,
        "scoring": scoring,
        "targets": {
            "speedup_at_last_context_ge_20": generation[-1]["speedup"] >= 20,
            "decode_ratio_le_1.5": ratio <= 1.5,
        },
    }
    table = Table(title=f"evo2 infer, preset {args.preset} ({model.num_parameters():,} parameters), CPU fp32")
    for column in (
        "context",
        "prefill s",
        "cached ms/tok",
        "cached tok/s",
        "naive ms/tok",
        "naive tok/s",
        "speedup",
    ):
        table.add_column(column, justify="right")
    for g in generation:
        table.add_row(
            f"{g['context']:,}",
            f"{g['prefill_s']:.2f}",
            f"{g['cached_ms_per_token']:.2f}",
            f"{g['cached_tokens_per_s']:.0f}",
            f"{g['naive_ms_per_token']:.0f}",
            f"{g['naive_tokens_per_s']:.2f}",
            f"{g['speedup']:.0f}x",
        )
    console = Console()
    console.print(table)
    console.print(
        f"decode per token, {generation[-1]['context']:,} vs {generation[0]['context']:,}: {ratio:.2f}x; "
        f"scoring {scoring['bases']:,} bases: {scoring['bases_per_s']:,.0f} bases/s "
        f"({scoring['seconds']:.1f} s)"
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
