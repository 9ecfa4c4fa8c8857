"""Model speed on a CPU in fp32: forward, forward + backward, cached decoding, the official engine as anchor.

    .venv/bin/python benchmarks/model_bench.py [--json runs/bench/model.json]
        [--vtx-path DIR ...]    directories holding the `vortex` package of `vtx` (and its einops/tqdm),
                                for example an unpacked `pip download vtx --no-deps` wheel

What it measures, on the `small` preset with one fixed random init (batch 1):
- forward tokens/s at L = 1k, 8k, 32k (inference mode);
- forward + backward tokens/s (cross-entropy on next-token targets) at the same lengths;
- cached decoding ms/token after a prompt of 1k and 32k tokens (prefill, then 32 single-token steps),
  against the naive baseline of a full re-forward of the whole context per new token; also for the same
  model without attention layers, whose hyena layers must be O(1) per token;
- `vtx` (Vortex, the official Evo 2 engine) full-sequence forward on the same weights (exported with
  `export_vortex`) and the same input, loaded in this process with its CUDA-only pieces stubbed
  (benchmarks/vtx_cpu.py says how to get vtx and what is stubbed). Its logits are compared with ours first,
  so the figures compare the same computation; then the two forwards are timed alternately, run by run, so
  that load from other jobs on the machine hits both alike. A length whose vtx attention scores would not
  fit in memory (its CPU path materializes (heads, L, L) fp32 scores and probabilities) is skipped.

Each figure is the best of a few runs (fewer at long lengths). The load average before and after is
recorded: other jobs on the machine lower the absolute rates; the ratios of one run are the figures to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_machine import describe  # noqa: E402

from evo2_cli.model import StripedHyena, preset_config  # noqa: E402
from evo2_cli.model.vortex import export_vortex  # noqa: E402

SEED = 0


def _best_times(runs: dict[str, Callable[[], object]], repeats: int, warmup: bool) -> dict[str, float]:
    """Best wall time of each function, the functions taking turns run by run."""
    if warmup:
        for fn in runs.values():
            fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _repeats(length: int) -> tuple[int, bool]:
    return (3, True) if length <= 2048 else (2, True) if length <= 8192 else (1, False)


def _ids(length: int) -> torch.Tensor:
    """A random ACGT byte sequence (1, length), the same for a given length."""
    bases = torch.randint(0, 4, (1, length), generator=torch.Generator().manual_seed(length))
    return torch.tensor([65, 67, 71, 84])[bases]


def _available_memory() -> int:
    with open("/proc/meminfo") as handle:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
    return fields["MemAvailable"]


def bench_forward(model: StripedHyena, lengths: list[int], vtx=None) -> tuple[dict, dict]:
    """Forward tokens/s of our model and, when given, vtx's, timed alternately at each length."""
    ours, theirs, skipped = {}, {}, {}
    model.eval()
    for length in lengths:
        ids = _ids(length)
        runs = {"ours": lambda ids=ids: model(ids)}
        if vtx is not None:
            need = 2 * model.config.num_attention_heads * length * length * 4
            if need > 0.6 * _available_memory():
                skipped[str(length)] = (
                    f"vtx's CPU attention would materialize {need / 2**30:.0f} GiB of (heads, L, L) fp32 "
                    f"scores and probabilities; {_available_memory() / 2**30:.0f} GiB available"
                )
            else:
                runs["vtx"] = lambda ids=ids: vtx(ids)
        with torch.inference_mode():
            seconds = _best_times(runs, *_repeats(length))
        ours[str(length)] = length / seconds["ours"]
        line = f"  forward L={length}: ours {ours[str(length)]:,.0f} tokens/s"
        if "vtx" in seconds:
            theirs[str(length)] = length / seconds["vtx"]
            line += f", vtx {theirs[str(length)]:,.0f} tokens/s"
        print(
            line + (f" (vtx skipped: {skipped[str(length)]})" if str(length) in skipped else ""), flush=True
        )
    return ours, {"forward_tokens_per_s": theirs, "skipped": skipped}


def bench_train_step(model: StripedHyena, lengths: list[int]) -> dict[int, float]:
    out = {}
    model.train()
    for length in lengths:
        ids = _ids(length + 1)

        def step(ids=ids):
            model.zero_grad(set_to_none=True)
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()

        out[length] = length / _best_times({"ours": step}, *_repeats(length))["ours"]
        print(f"  forward+backward L={length}: {out[length]:,.0f} tokens/s", flush=True)
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


def bench_decode(model: StripedHyena, contexts: list[int], steps: int) -> dict[int, dict[str, float]]:
    out = {}
    model.eval()
    for context in contexts:
        ids = _ids(context + steps)
        cache = model.new_cache(1)
        start = time.perf_counter()
        model.prefill(ids[:, :context], cache)
        prefill = time.perf_counter() - start
        model.step(ids[:, context], cache)  # warm-up step
        start = time.perf_counter()
        for t in range(context + 1, context + steps):
            model.step(ids[:, t], cache)
        per_token = (time.perf_counter() - start) / (steps - 1)
        with torch.inference_mode():  # naive baseline: the whole context again for each new token
            full = {"ours": lambda n=context + 1, ids=ids: model(ids[:, :n])}
            naive = _best_times(full, 1, context <= 8192)["ours"]
        out[context] = {
            "prefill_tokens_per_s": context / prefill,
            "decode_ms_per_token": per_token * 1e3,
            "naive_ms_per_token": naive * 1e3,
        }
        print(
            f"  decode ctx={context}: {per_token * 1e3:.2f} ms/token "
            f"(naive re-forward {naive * 1e3:,.0f} ms/token)",
            flush=True,
        )
    return out


# ---------------------------------------------------------------- vtx, in this process


def load_vtx(model: StripedHyena, paths: list[str], tmp: Path):
    """vtx's StripedHyena holding our model's weights (exported to the Vortex layout), and the max abs
    difference of its logits from ours on a 1k input."""
    import vtx_cpu

    vtx_cpu.install_cpu_shims(paths)
    weights, config = tmp / "w.pt", tmp / "c.yml"
    export_vortex(model, weights, config)
    vtx, _ = vtx_cpu.load_model(str(config), str(weights))
    ids = _ids(1024)
    with torch.inference_mode():
        diff = float((vtx(ids)[0].float() - model.eval()(ids)).abs().max())
    return lambda ids: vtx(ids)[0], diff


# ---------------------------------------------------------------- report


def machine() -> dict:
    return {**describe(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"preset small ({result['parameters']:,} parameters), CPU fp32, batch 1"
    table = Table(title=f"full sequence, {title}")
    lengths = [str(n) for n in result["lengths"]]
    table.add_column("tokens/s")
    for n in lengths:
        table.add_column(f"L={n}", justify="right")

    def row(table, name, values, keys, fmt="{:,.0f}"):
        table.add_row(name, *[fmt.format(values[k]) if k in values else "-" for k in keys])

    row(table, "forward", result["forward_tokens_per_s"], lengths)
    vtx = result.get("vtx", {})
    theirs = vtx.get("forward_tokens_per_s", {})
    row(table, "vtx forward (same weights)", theirs, lengths)
    ratio = {k: result["forward_tokens_per_s"][k] / v for k, v in theirs.items()}
    row(table, "forward speed-up, ours / vtx", ratio, lengths, "{:.2f}x")
    row(table, "forward + backward", result["train_tokens_per_s"], lengths)
    Console(width=120).print(table)

    contexts = list(result["decode"])
    table = Table(title=f"cached decoding, {title}")
    table.add_column("ms per new token")
    for n in contexts:
        table.add_column(f"context {n}", justify="right")
    for name, key in (("", "decode"), (" (no attention layers)", "decode_no_attention")):
        values = result[key]
        row(
            table,
            f"cached step{name}",
            {k: v["decode_ms_per_token"] for k, v in values.items()},
            contexts,
            "{:.2f}",
        )
        row(
            table, f"full re-forward{name}", {k: v["naive_ms_per_token"] for k, v in values.items()}, contexts
        )
    Console(width=120).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,8192,32768")
    parser.add_argument("--decode-contexts", default="1024,32768")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--vtx-path", action="append", default=[], help="directory holding vtx's `vortex`")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "model.json")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    contexts = [int(x) for x in args.decode_contexts.split(",")]

    info = machine()
    info["load_before"] = os.getloadavg()
    print(f"machine: {info}", flush=True)
    torch.manual_seed(SEED)
    config = preset_config("small")
    model = StripedHyena(config)
    no_attention = StripedHyena(preset_config("small", layout="SDHSDHSD"))
    result = {"machine": info, "preset": "small", "parameters": model.num_parameters(), "lengths": lengths}

    vtx = None
    if args.vtx_path:
        with tempfile.TemporaryDirectory() as tmp:
            vtx, diff = load_vtx(model, [str(Path(p).resolve()) for p in args.vtx_path], Path(tmp))
        print(f"vtx (official engine) on the same weights: max |logits - ours| = {diff:.2e} at L=1024")
    print("forward:", flush=True)
    result["forward_tokens_per_s"], result["vtx"] = bench_forward(model, lengths, vtx)
    if vtx is None:
        result["vtx"] = {"error": "not run: pass --vtx-path DIR (an unpacked vtx wheel and its einops, tqdm)"}
    else:
        result["vtx"]["version"], result["vtx"]["max_abs_diff_vs_ours"] = version("vtx"), diff
    print("ours:", flush=True)
    result["train_tokens_per_s"] = {str(k): v for k, v in bench_train_step(model, lengths).items()}
    result["decode"] = {str(k): v for k, v in bench_decode(model, contexts, args.decode_steps).items()}
    print("ours without attention layers (layout SDHSDHSD):", flush=True)
    result["decode_no_attention"] = {
        str(k): v for k, v in bench_decode(no_attention, contexts, args.decode_steps).items()
    }
    info["load_after"] = os.getloadavg()
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
