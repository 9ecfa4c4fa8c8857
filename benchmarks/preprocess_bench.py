"""Throughput of `evo2 preprocess` against the plain Biopython baseline and bare gzip decompression.

Generates a synthetic FASTA (60-column lines, mixed case, some N runs; --mbases million bases), then in one
run measures, on the same files from the page cache:
  - Biopython: `SeqIO.parse` then each sequence's bytes into numpy (plain and gzip input)
  - bare gzip decompression of the .gz file: Python's zlib and the `gzip -dc` tool (the baseline of the
    target), and ISA-L (`isal`, what our reader inflates with when it is installed) for information
  - `evo2 preprocess` end to end (the CLI as a user runs it, process start included), plain, gzip and bgzip
    input (BGZF, as `bgzip` writes it: cut into byte ranges like a plain file), one worker and --workers N,
    with the peak RSS of the run (largest process)
  - the memory check: `evo2 preprocess` on a FASTA of one --big-record-mbases record, as it is and with
    reverse complements (a recipe that needs each record whole, in one buffer); peak RSS minus the largest
    record must stay under 512 MB, whatever the record and the file size
  - the fixed cost of one `evo2 preprocess` run, on a 4-base FASTA
  - many short records (--reads reads of 150 bases, shuffled names): Biopython and `evo2 preprocess`, where
    the per-record costs show (bookkeeping, sorting, the write); then --more-reads times as many reads, whose
    peak RSS must stay within 64 MB of the first (memory must not grow with the record count)
Each worker-count target also gives the most any schedule could reach on the cores used (the one-worker
run's CPU time after start-up spread evenly over them, start-up serial). Each row is the fastest of --repeat
runs (3; a single run moves by 5-10% on a shared VM), except the short-read rows (one run each). Prints a
rich table, the targets of the issue with a verdict, and JSON (also written to --json PATH).

    .venv/bin/python benchmarks/preprocess_bench.py --mbases 200 --json runs/bench/preprocess.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from bench_machine import describe
from Bio import bgzf

WIDTH = 60


def generate(path: Path, mbases: int, seed: int = 0, lengths=(200_000, 5_000_000)) -> tuple[int, int]:
    """Records of 0.2-5 Mbases (`lengths`): uppercase with lowercase stretches (soft-masked repeats) and N
    runs. Returns (bases, bases of the largest record)."""
    rng = np.random.default_rng(seed)
    target, total, index, largest = mbases * 1_000_000, 0, 0, 0
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    with open(path, "wb") as handle:
        while total < target:
            length = int(min(rng.integers(*lengths), target - total))
            largest = max(largest, length)
            sequence = letters[rng.integers(0, 4, length)]
            for start in rng.integers(0, length, max(1, length // 50_000)):  # soft-masked stretches
                sequence[start : start + int(rng.integers(100, 5_000))] |= 0x20
            for start in rng.integers(0, length, max(1, length // 500_000)):  # assembly gaps
                sequence[start : start + int(rng.integers(10, 2_000))] = ord("N")
            rows = -(-length // WIDTH)
            lines = np.full((rows, WIDTH + 1), ord("\n"), dtype=np.uint8)
            padded = np.zeros(rows * WIDTH, dtype=np.uint8)
            padded[:length] = sequence
            lines[:, :WIDTH] = padded.reshape(rows, WIDTH)
            body = lines.tobytes()
            tail = rows * WIDTH - length  # the last line is short: drop its padding
            body = body[: len(body) - tail - 1] + b"\n" if tail else body
            handle.write(f">chr{index} synthetic record {index}\n".encode() + body)
            total += length
            index += 1
    return total, largest


def generate_reads(path: Path, count: int, length: int = 150, seed: int = 0) -> int:
    """`count` reads of `length` random bases, one line each, named in shuffled order (the canonical order
    then differs from the file order, as it does for most real read sets). Returns the bases."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    names = rng.permutation(count)
    with open(path, "wb") as handle:
        for start in range(0, count, 100_000):
            stop = min(start + 100_000, count)
            bases = letters[rng.integers(0, 4, (stop - start) * length)].reshape(-1, length)
            handle.write(
                b"".join(
                    b">read%09d sample=1\n%s\n" % (names[i], bases[i - start].tobytes())
                    for i in range(start, stop)
                )
            )
    return count * length


class Usage(NamedTuple):
    cpu_seconds: float  # user + system, every thread and child process
    peak_rss_kb: int | None  # the largest process, for runs in a child process


def in_process(function) -> Usage:
    before = resource.getrusage(resource.RUSAGE_SELF)
    function()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, None)


# Runs a command in a fresh process; prints its children's CPU time and largest peak RSS (workers included).
_CHILD_USAGE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); print(u.ru_utime + u.ru_stime, u.ru_maxrss)"
)


# Runs of `evo2` may write bytecode caches, as an installed package has them (pip compiles on install): a
# sandbox that sets PYTHONDONTWRITEBYTECODE would otherwise recompile evo2_cli in every run (about 30 ms).
_CHILD_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def child_process(command: list[str]) -> Usage:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD_USAGE, *command],
        check=True,
        capture_output=True,
        text=True,
        env=_CHILD_ENV,
    )
    cpu, rss = done.stdout.split()[-2:]
    return Usage(float(cpu), int(rss))


def biopython(path: Path) -> None:
    from Bio import SeqIO

    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as handle:
        for record in SeqIO.parse(handle, "fasta"):
            np.frombuffer(bytes(record.seq), dtype=np.uint8)


def our_reader(path: Path) -> None:
    from evo2_cli.data.fasta import read_fasta

    for record in read_fasta(path):
        np.frombuffer(record.sequence, dtype=np.uint8)


def bare_decompress(path: Path, library=zlib) -> None:
    inflater = library.decompressobj(31)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            inflater.decompress(chunk)


def evo2_preprocess(path: Path, out: Path, workers: int | str, *sets: str) -> Usage:
    """`evo2 preprocess` in a child process; `sets`: config overrides (KEY=VALUE)."""
    evo2 = Path(sys.executable).with_name("evo2")
    command = [str(evo2), "preprocess", str(path), "-o", str(out), "--workers", str(workers), "--overwrite"]
    command += [arg for key_value in sets for arg in ("--set", key_value)]
    usage = child_process(command)
    shutil.rmtree(out)
    return usage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mbases", type=int, default=200, help="size of the synthetic FASTA (million bases)")
    parser.add_argument(
        "--big-record-mbases", type=int, default=100, help="size of the one-record FASTA of the memory check"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="workers of the parallel run")
    parser.add_argument(
        "--reads", type=int, default=1_000_000, help="short reads of the many-records runs (0: none)"
    )
    parser.add_argument(
        "--more-reads",
        type=int,
        default=4,
        help="the memory-per-record check also runs this many times --reads reads (0 or 1: no check)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per row (the fastest is kept); the short-read rows run once",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=130)
    work = Path(args.dir or tempfile.mkdtemp(prefix="evo2-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    plain, packed, big = work / "bench.fa", work / "bench.fa.gz", work / "one_record.fa"
    blocked = work / "bench.fa.bgz"
    reads, more_reads = work / "reads.fa", work / "more_reads.fa"
    try:
        with console.status(f"generating {args.mbases} Mbases"):
            bases, largest = generate(plain, args.mbases)
            with open(plain, "rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target, 1 << 22)
            with open(plain, "rb") as source, bgzf.BgzfWriter(blocked, "wb") as target:  # level 6, as bgzip
                shutil.copyfileobj(source, target, 1 << 22)
            big_bases, _ = generate(big, args.big_record_mbases, lengths=(10**12, 10**12 + 1))
            read_bases = generate_reads(reads, args.reads) if args.reads else 0
            check_growth = args.reads and args.more_reads > 1
            more_bases = (
                generate_reads(more_reads, args.reads * args.more_reads, seed=1) if check_growth else 0
            )
        rows: list[dict] = []

        def measure(
            name: str,
            kind: str,
            function,
            size: int = bases,
            record: int = largest,
            repeat: int = args.repeat,
        ) -> dict:
            """Times `function` (which returns its Usage) on `size` bases whose largest record is `record`:
            the fastest of `repeat` runs (one run moves by 5-10% on a shared VM), with its CPU time, and the
            largest peak RSS of them."""
            runs = []
            with console.status(f"{name} ({kind})"):
                for _ in range(repeat):
                    start = time.perf_counter()
                    usage = function()
                    runs.append((time.perf_counter() - start, usage))
            seconds, usage = min(runs, key=lambda run: run[0])
            peaks = [run_usage.peak_rss_kb for _, run_usage in runs if run_usage and run_usage.peak_rss_kb]
            row = {
                "name": name,
                "input": kind,
                "seconds": round(seconds, 3),
                "mbases_per_s": round(size / seconds / 1e6, 1),
                "cpu_seconds": round(usage.cpu_seconds, 3) if usage else None,
                "peak_rss_mb": round(max(peaks) / 1024, 1) if peaks else None,
                "largest_record_mb": round(record / 2**20, 1),
            }
            rows.append(row)
            return row

        def rate(row: dict) -> float:
            return row["mbases_per_s"]

        out, n = work / "out", args.workers
        tiny = work / "tiny.fa"
        tiny.write_bytes(b">tiny\nACGT\n")
        evo2_preprocess(tiny, out, 1)  # untimed: writes the bytecode caches a first run leaves behind
        bio_plain = measure("biopython SeqIO.parse", "plain", lambda: in_process(lambda: biopython(plain)))
        reader = measure(
            "evo2_cli read_fasta (reader only)", "plain", lambda: in_process(lambda: our_reader(plain))
        )
        ours_1 = measure("evo2 preprocess --workers 1", "plain", lambda: evo2_preprocess(plain, out, 1))
        ours_n = measure(f"evo2 preprocess --workers {n}", "plain", lambda: evo2_preprocess(plain, out, n))
        measure("biopython SeqIO.parse", "gzip", lambda: in_process(lambda: biopython(packed)))
        zlib_row = measure(
            "bare decompression: python zlib", "gzip", lambda: in_process(lambda: bare_decompress(packed))
        )
        from evo2_cli.data.fasta import inflate_lib

        if inflate_lib is not zlib:
            measure(
                "bare decompression: isal (ISA-L)",
                "gzip",
                lambda: in_process(lambda: bare_decompress(packed, inflate_lib)),
            )
        tool_row = measure(
            "bare decompression: gzip -dc", "gzip", lambda: child_process(["gzip", "-dc", str(packed)])
        )
        measure("evo2_cli read_fasta (reader only)", "gzip", lambda: in_process(lambda: our_reader(packed)))
        # One gzip stream is read by one worker (several files spread over workers).
        ours_gzip = measure("evo2 preprocess --workers 1", "gzip", lambda: evo2_preprocess(packed, out, 1))
        ours_gzip_n = measure(
            f"evo2 preprocess --workers {n}", "gzip", lambda: evo2_preprocess(packed, out, n)
        )
        # A bgzip file is cut into byte ranges at block boundaries, like a plain file.
        ours_bgzip = measure("evo2 preprocess --workers 1", "bgzip", lambda: evo2_preprocess(blocked, out, 1))
        ours_bgzip_n = measure(
            f"evo2 preprocess --workers {n}", "bgzip", lambda: evo2_preprocess(blocked, out, n)
        )
        measure("evo2 preprocess --workers auto", "plain", lambda: evo2_preprocess(plain, out, "auto"))
        measure(
            "evo2 preprocess --workers 1",
            "plain, 1 record",
            lambda: evo2_preprocess(big, out, 1),
            size=big_bases,
            record=big_bases,
        )
        measure(
            "evo2 preprocess --workers 1",
            "1 record, reverse compl.",
            lambda: evo2_preprocess(big, out, 1, "preprocess.reverse_complement=true"),
            size=big_bases,
            record=big_bases,
        )
        if args.reads:
            kind = f"{args.reads:,} reads of 150"
            measure(
                "biopython SeqIO.parse",
                kind,
                lambda: in_process(lambda: biopython(reads)),
                read_bases,
                150,
                repeat=1,
            )
            for workers in sorted({1, n}):
                measure(
                    f"evo2 preprocess --workers {workers}",
                    kind,
                    lambda workers=workers: evo2_preprocess(reads, out, workers),
                    read_bases,
                    150,
                    repeat=1,
                )
        if check_growth:
            more = measure(
                "evo2 preprocess --workers 1",
                f"{args.reads * args.more_reads:,} reads of 150",
                lambda: evo2_preprocess(more_reads, out, 1),
                more_bases,
                150,
                repeat=1,
            )
            fewer = next(row for row in rows if row["input"] == kind and row["name"].endswith("--workers 1"))
        # What every run pays whatever its input: interpreter start, imports, option parsing, output files.
        startup = measure(
            "evo2 preprocess --workers 1", "4 bases (start-up)", lambda: evo2_preprocess(tiny, out, 1), 4, 4
        )
        cores = min(n, len(os.sched_getaffinity(0)))

        def speedup(one: dict, many: dict) -> dict:
            """`many` against `one` (the one-worker run of the same input), and the most that any schedule on
            `cores` cores could give: the start-up stays serial and the rest of the one-worker run's CPU time
            is spread over the cores with no overhead at all (the reader's and hasher's threads included)."""
            spread = (one["cpu_seconds"] - startup["cpu_seconds"]) / cores
            return {
                "measured": round(one["seconds"] / many["seconds"], 2),
                "bound": round(one["seconds"] / (startup["seconds"] + spread), 2),
            }

        best_plain = max(ours_1, ours_n, key=rate)
        bare = max(zlib_row, tool_row, key=rate)
        ours = [row for row in rows if row["name"].startswith("evo2 preprocess")]
        rss_margin = max(row["peak_rss_mb"] - row["largest_record_mb"] for row in ours)
        targets = [
            {
                "target": f"--workers {n} >= 1.6x faster than one worker, one plain file",
                **speedup(ours_1, ours_n),
                "goal": 1.6,
                "note": f"{ours_1['seconds']} s against {ours_n['seconds']} s",
            },
            {
                "target": f"--workers {n} >= 1.6x faster than one worker, one gzip file",
                **speedup(ours_gzip, ours_gzip_n),
                "goal": 1.6,
                "note": f"{ours_gzip['seconds']} s, {ours_gzip_n['seconds']} s (one reader per gzip)",
            },
            {
                "target": f"--workers {n} >= 1.6x faster than one worker, one bgzip file",
                **speedup(ours_bgzip, ours_bgzip_n),
                "goal": 1.6,
                "note": f"{ours_bgzip['seconds']} s against {ours_bgzip_n['seconds']} s",
            },
            {
                "target": "end to end >= 1.0x Biopython's parse alone (plain)",
                "measured": round(rate(best_plain) / rate(bio_plain), 2),
                "goal": 1.0,
                "note": f"best evo2 preprocess run ({best_plain['name']}), start-up and writing included",
            },
            {
                "target": "plain input >= 3x Biopython",
                "measured": round(rate(best_plain) / rate(bio_plain), 2),
                "goal": 3.0,
                "note": f"best evo2 preprocess run ({best_plain['name']})",
            },
            {
                "target": "gzip input >= 0.7x bare decompression",
                "measured": round(rate(ours_gzip) / rate(bare), 2),
                "goal": 0.7,
                "note": f"against the faster of zlib and gzip -dc ({bare['name']}); "
                f"evo2 inflates with {inflate_lib.__name__}",
            },
            {
                "target": "peak RSS <= largest record + 512 MB",
                "measured": round(rss_margin, 1),
                "goal": 512.0,
                "note": "the worst evo2 preprocess run: peak RSS minus its largest record, MB",
            },
        ]
        if check_growth:
            targets.append(
                {
                    "target": "peak RSS does not grow with the record count (at most +64 MB)",
                    "measured": round(more["peak_rss_mb"] - fewer["peak_rss_mb"], 1),
                    "goal": 64.0,
                    "note": f"peak RSS, MB: {args.more_reads}x the reads minus --reads reads, one worker",
                }
            )
        for target in targets:
            ok = target["measured"] <= target["goal"] if "RSS" in target["target"] else None  # at most
            target["met"] = ok if ok is not None else target["measured"] >= target["goal"]
        result = {
            "machine": describe(),
            "mbases": bases / 1e6,
            "plain_bytes": plain.stat().st_size,
            "gzip_bytes": packed.stat().st_size,
            "bgzip_bytes": blocked.stat().st_size,
            "rows": rows,
            "reader_plain_vs_biopython": round(rate(reader) / rate(bio_plain), 2),
            "cores": cores,
            "targets": targets,
        }
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"preprocess throughput, {bases / 1e6:.0f} Mbases")
    for column in ("run", "input", "seconds", "Mbases/s", "CPU s", "peak RSS MB", "largest record MB"):
        table.add_column(column, justify="left" if column in ("run", "input") else "right")
    for row in result["rows"]:
        cells = [row[key] for key in ("seconds", "mbases_per_s", "cpu_seconds", "peak_rss_mb")]
        cells.append(row["largest_record_mb"])
        table.add_row(row["name"], row["input"], *("" if cell is None else str(cell) for cell in cells))
    console.print(table)
    console.print(f"reader only vs Biopython (plain): {result['reader_plain_vs_biopython']}x")
    for target in result["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        bound = f"; at most {target['bound']} on {cores} cores" if "bound" in target else ""
        console.print(f"{target['target']}: {target['measured']} ({verdict}; {target['note']}{bound})")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
