"""Model speed on a CPU in fp32: forward, forward + backward, cached decoding, the official engine as anchor.

    .venv/bin/python benchmarks/model_bench.py [--json benchmarks/results/model.json]
        [--vtx-path DIR ...]    directories holding the `vortex` package of `vtx` (and its einops/tqdm),
                                for example an unpacked `pip download vtx --no-deps` wheel

What it measures, on the `small` preset with one fixed random init (batch 1):
- forward tokens/s at L = 1k, 8k, 32k (inference mode);
- forward + backward tokens/s (cross-entropy on next-token targets) at the same lengths;
- cached decoding ms/token after a prompt of 1k and 32k tokens (prefill, then 32 single-token steps),
  against the naive baseline of a full re-forward of the whole context per new token; also for the same
  model without attention layers, whose hyena layers must be O(1) per token;
- `vtx` (Vortex, the official Evo 2 engine) full-sequence forward on the same weights and input, run in a
  subprocess with its CUDA-only pieces stubbed (benchmarks/vtx_cpu.py says how to get vtx and what is
  stubbed); its logits are compared with ours first, so the figures compare the same computation.

The figures depend on what else runs on the machine: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evo2_cli.model import StripedHyena, preset_config  # noqa: E402
from evo2_cli.model.vortex import export_vortex  # noqa: E402

SEED = 0


def _best_time(fn, repeats: int, warmup: bool) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _repeats(length: int) -> tuple[int, bool]:
    return (3, True) if length <= 2048 else (2, True) if length <= 8192 else (1, False)


def _ids(length: int) -> torch.Tensor:
    """A random ACGT byte sequence (1, length), the same for a given length here and in the vtx worker."""
    bases = torch.randint(0, 4, (1, length), generator=torch.Generator().manual_seed(length))
    return torch.tensor([65, 67, 71, 84])[bases]


def bench_forward(model: StripedHyena, lengths: list[int]) -> dict[int, float]:
    out = {}
    model.eval()
    for length in lengths:
        ids = _ids(length)
        repeats, warmup = _repeats(length)
        with torch.inference_mode():
            seconds = _best_time(lambda ids=ids: model(ids), repeats, warmup)
        out[length] = length / seconds
        print(f"  forward L={length}: {out[length]:,.0f} tokens/s", flush=True)
    return out


def bench_train_step(model: StripedHyena, lengths: list[int]) -> dict[int, float]:
    out = {}
    model.train()
    for length in lengths:
        ids = _ids(length + 1)

        def step(ids=ids):
            model.zero_grad(set_to_none=True)
            logits = model(ids[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()

        repeats, warmup = _repeats(length)
        out[length] = length / _best_time(step, repeats, warmup)
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
            naive = _best_time(lambda n=context + 1, ids=ids: model(ids[:, :n]), 1, context <= 8192)
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


# ---------------------------------------------------------------- vtx, in a subprocess


def bench_vtx(model: StripedHyena, paths: list[str], lengths: list[int]) -> dict:
    """vtx's forward on our weights, in a subprocess (benchmarks/vtx_cpu.py); first checks its logits."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, config, ids_path, out = (Path(tmp) / name for name in ("w.pt", "c.yml", "ids.pt", "out.pt"))
        export_vortex(model, weights, config)
        ids = _ids(1024)
        torch.save(ids, ids_path)
        request = {"paths": paths, "config": str(config), "weights": str(weights), "ids": str(ids_path)}
        request |= {"out": str(out), "bench_lengths": lengths}
        script = Path(__file__).with_name("vtx_cpu.py")
        proc = subprocess.run(
            [sys.executable, str(script), json.dumps(request)], capture_output=True, text=True, timeout=3600
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            return {"error": tail}
        result = torch.load(out, weights_only=True)
    for line in proc.stderr.splitlines():
        if line.startswith("  vtx"):
            print(line)
    with torch.inference_mode():
        result["max_abs_diff_vs_ours"] = float((result.pop("logits") - model.eval()(ids)).abs().max())
    result["forward_tokens_per_s"] = {str(k): v for k, v in result["forward_tokens_per_s"].items()}
    result["skipped"] = {str(k): v for k, v in result["skipped"].items()}
    return result


# ---------------------------------------------------------------- report


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


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
    row(table, "vtx forward (same weights)", vtx.get("forward_tokens_per_s", {}), lengths)
    row(table, "forward + backward", result["train_tokens_per_s"], lengths)
    Console().print(table)

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
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,8192,32768")
    parser.add_argument("--decode-contexts", default="1024,32768")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--vtx-path", action="append", default=[], help="directory holding vtx's `vortex`")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "model.json")
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

    print("vtx (official engine), same weights:", flush=True)
    if args.vtx_path:
        result["vtx"] = bench_vtx(model, [str(Path(p).resolve()) for p in args.vtx_path], lengths)
    else:
        result["vtx"] = {"error": "not run: pass --vtx-path DIR (an unpacked vtx wheel and its einops, tqdm)"}
    print(f"  {json.dumps({k: v for k, v in result['vtx'].items() if k != 'forward_tokens_per_s'})}")
    print("ours:", flush=True)
    result["forward_tokens_per_s"] = {str(k): v for k, v in bench_forward(model, lengths).items()}
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
