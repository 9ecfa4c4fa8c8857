"""The training loop: one function, `train`, read top to bottom. `evo2 train` and `evo2 finetune` (language
modelling and task heads) run through it; `evo2 diagnose-grads` takes its steps (train/step.py) alone.
Keyword arguments:

    model=      start from this module instead of a fresh `StripedHyena(job.model)` (a loaded checkpoint, a
                model with adapters); it must have `.blocks` and `.activation_checkpointing` like StripedHyena
    trainable=  `(name, parameter) -> bool`; parameters it rejects are frozen (no grad, not in the optimizer)
    hooks=      `TrainHooks(after_backward=..., after_step=...)`, called with a `StepInfo` on every rank
    objective=  what is trained (train/step.py); default: language modelling on the windows of `job.data`
    write_model_files=  `(model, directory, *, config, meta)` writing model.safetensors, config.yaml and
                meta.json of a checkpoint (default: the model package's); resume loads `model.safetensors`
                back into the model with `load_state_dict` (a finetune's trained tensors alone onto the
                given model, which holds their base)

Per step: lr from the schedule (times the guard's backoff), `global_batch / micro_batch` micro-batches split
over the processes (micro-batch k of a step holds samples data_position + k * micro_batch + j of the
objective's stream; rank r runs k = r, r + world, ...), the step (train/step.py: forward under autocast, loss
normalized over the global batch, backward, clip, guard verdict, optimizer step or skip), a rollback when the
guard asks for one, log, evaluate, checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from evo2_cli.config import to_yaml
from evo2_cli.console import make_console
from evo2_cli.errors import Evo2Error, InputError
from evo2_cli.model import StripedHyena, estimate_flops
from evo2_cli.model.checkpoint import (
    BASE,
    all_finite,
    best_checkpoint,
    load_weights_into,
    read_meta,
    read_weights,
)
from evo2_cli.model.checkpoint import write_model_files as package_write_model_files
from evo2_cli.train.checkpoint import RunDirectory, read_train_state, truncate_metrics, write_checkpoint
from evo2_cli.train.config import TrainJob
from evo2_cli.train.data import (
    dataset_changes,
    dataset_identity,
    no_val_message,
    split_windows,
    validation_windows,
)
from evo2_cli.train.distributed import (
    full_tensor,
    meta_copy,
    parallelize,
    run_on_main,
    start_runtime,
    stop_runtime,
)
from evo2_cli.train.guard import GradientGuard, GuardState, Verdict
from evo2_cli.train.memory import preflight_memory
from evo2_cli.train.metrics import MetricsLog, peak_flops, progress_line
from evo2_cli.train.optim import build_optimizer, learning_rate
from evo2_cli.train.origin import FP32_EXP_LIMIT, StepWatch, hcl_overflow_detail, hcl_stats
from evo2_cli.train.step import LanguageModel, Objective, StepInfo, TrainHooks, TrainStep

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # SLURM sends SIGUSR1 (--signal) before the time limit


@dataclass
class LoopState:
    """The loop's position; saved in every checkpoint so a resume continues exactly."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    data_position: int = 0  # first sample index of the next step
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    guard: GuardState = field(default_factory=GuardState)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the last checkpoint written
    best_checkpoint: Path | None
    step: int
    stop_reason: str  # "max_steps", "early_stopping" or "signal"
    is_main: bool  # rank 0 (the one that prints and writes)
    last_val: dict[str, float] | None
    losses: list[float]  # the training loss of every step this call ran


def train(
    job: TrainJob,
    *,
    resume: str = "auto",
    overwrite: bool = False,
    allow_data_change: bool = False,
    verify: bool = True,
    model: nn.Module | None = None,
    trainable: Callable[[str, nn.Parameter], bool] | None = None,
    hooks: TrainHooks | None = None,
    objective: Objective | None = None,
    write_model_files: Callable[..., object] = package_write_model_files,
    console: Console | None = None,
) -> TrainResult:
    """Train `job` (see the module docstring); `resume` is "auto" (the run directory's latest checkpoint,
    if any) or a checkpoint directory, whose files are checked against their sha256 unless `verify` is
    False (--no-verify). A resume refuses datasets whose content changed since the checkpoint unless
    `allow_data_change`. `objective` defaults to language modelling on `job.data`."""
    cfg, console = job.train, console or make_console()
    runtime = start_runtime(cfg.device, cfg.precision)
    wrapped = watch = None
    # From the start: a signal while loading or validating still ends in a checkpoint after one step.
    signals = contextlib.ExitStack()
    stop_requested = signals.enter_context(_stop_on_signals(announce=runtime.is_main))
    try:
        accumulation = micro_batches_per_process(job.optim.global_batch, cfg.micro_batch, runtime.world_size)
        job_yaml = to_yaml(job)
        say = functools.partial(console.print, highlight=False, soft_wrap=True) if runtime.is_main else _quiet

        # ---- data: every dataset problem surfaces before anything is written
        data = job.data
        objective = objective or _language_model(job, say)
        if model is None:  # a finetune estimated its adapted model itself, before loading the weights
            say(f"memory: {preflight_memory(job, runtime).describe()}")

        # ---- run directory (locked), model, starting point: nothing is written until the starting
        # checkpoint has loaded, and an old run --overwrite replaces stays until the first checkpoint
        run = RunDirectory(cfg.run_dir, overwrite, say)
        run_on_main(runtime, lambda: signals.enter_context(run))
        start = run.starting_checkpoint(resume, job, verify)
        saved = read_train_state(start) if start is not None else None
        if saved is not None:  # before the weights load: a refusal costs seconds, not minutes
            _check_made_by(start, saved, objective.kind)
            _check_data_identity(saved.get("data"), objective.identity, start, allow_data_change, say)
        torch.manual_seed(cfg.seed)
        holds_base = model is not None  # a finetune's model: a checkpoint of trained tensors goes onto it
        model = model if model is not None else StripedHyena(job.model)
        if start is not None:
            _load_weights(model, start, holds_base=holds_base)
        if trainable is not None:
            for name, param in model.named_parameters():
                param.requires_grad_(trainable(name, param))
        model.activation_checkpointing = cfg.activation_checkpointing
        model.to(runtime.device)
        fsdp = runtime.distributed and cfg.parallelism == "fsdp"
        skeleton = meta_copy(model) if fsdp else None  # what a gathered state dict is written from
        wrapped = parallelize(model, runtime, cfg.parallelism)
        watch = StepWatch(model)  # where a bad step started, for the guard's report
        shown: set[str] = set()  # detail lines of the guard's reports already printed (printed once)
        optimizer = build_optimizer(model, job.optim)
        params = [p for p in model.parameters() if p.requires_grad]
        state = LoopState()
        if saved is not None:
            _load_optimizer(model, optimizer, saved["optimizer"], fsdp)
            state = _loop_state(saved["loop"])
            runtime.restore_rng_state(saved["rng"])
        run_on_main(runtime, lambda: run.claim(job_yaml))
        if start is not None:
            run_on_main(runtime, lambda: truncate_metrics(cfg.run_dir, state.step))
            say(f"resumed from {start} at step {state.step}")
        guard = GradientGuard(job.guard, state.guard)

        def report_problem(info: StepInfo) -> None:
            head, *details = _describe_bad_step(
                info.step, info.verdict, info.loss, info.grad_norm, model, watch, data.seq_len
            )
            say("\n".join([head, *(line for line in details if line not in shown)]))
            shown.update(details)

        log = MetricsLog(cfg.run_dir, cfg.tensorboard) if runtime.is_main else None
        if log is not None and cfg.tensorboard and log.writer is None:
            say("[yellow]tensorboard not installed; logging to metrics.jsonl only[/]")
        tokens_per_step = job.optim.global_batch * data.seq_len
        train_flops_per_step = 3 * estimate_flops(job.model, data.seq_len) * job.optim.global_batch
        device_peak = peak_flops(runtime.device, runtime.autocast_dtype is not None, cfg.peak_flops)
        step_parts = (model, optimizer, objective, runtime, job.optim.grad_clip)
        take_step = TrainStep(*step_parts, wrapped, guard, hooks, report_problem)

        def save(is_best: bool = False, metrics: dict | None = None) -> Path:
            gathered = _full_model_state(model) if fsdp else None  # collective: every rank takes part
            train_state = {
                "optimizer": _full_optimizer_state(model, optimizer),  # collective too
                "loop": asdict(state),
                "rng": runtime.rng_state(),
                "data": objective.identity,
            }
            meta = {
                "tokens_seen": state.tokens_seen,
                "data_position": state.data_position,
                "world_size": runtime.world_size,
                "metrics": metrics or {},
                **objective.meta,
            }

            def write() -> Path:  # rank 0
                _refuse_non_finite(state.step, gathered or model.state_dict(), train_state, cfg.run_dir)
                plain = model
                if fsdp:
                    plain = meta_copy(skeleton)  # fresh each time: holds the gathered tensors until written
                    plain.load_state_dict(gathered, strict=True, assign=True)
                written = write_checkpoint(
                    cfg.run_dir,
                    state.step,
                    lambda directory, meta: write_model_files(plain, directory, config=job, meta=meta),
                    train_state,
                    meta,
                    cfg.keep_last,
                    is_best,
                )
                run.committed()
                return written

            return run_on_main(runtime, write)

        last_checkpoint = start if start is not None else save()  # step 0: a rollback target from the outset
        say(
            f"training {sum(p.numel() for p in params):,} parameters on {runtime.world_size} x "
            f"{runtime.device.type} ({'bf16 autocast' if runtime.autocast_dtype else 'fp32'}), "
            f"{accumulation} micro-batch(es) of {cfg.micro_batch} x {data.seq_len} per process per step"
        )
        say(f"MFU peak: {device_peak.flops:.3g} FLOP/s per device ({device_peak.source})")

        stop_reason, last_val, losses = "max_steps", None, []
        timed_seconds, timed_steps = 0.0, 0  # compute time of the steps since the last log line
        while state.step < cfg.max_steps:
            step_started = time.perf_counter()
            lr = learning_rate(state.step, job.optim, cfg.max_steps) * guard.state.lr_scale
            watch.start_step()
            batches = []
            for micro in range(accumulation):
                first = state.data_position + (micro * runtime.world_size + runtime.rank) * cfg.micro_batch
                batches.append(objective.batch(first, cfg.micro_batch, runtime.device))
            info, totals = take_step(state.step, lr, batches, stop_requested.is_set())
            state.step += 1
            state.data_position += job.optim.global_batch
            state.tokens_seen += tokens_per_step
            losses.append(info.loss)
            if len(losses) > 1 or state.step == cfg.max_steps:  # the first step of a process warms up
                timed_seconds += time.perf_counter() - step_started
                timed_steps += 1

            if info.verdict.roll_back:  # to the last checkpoint at a lower lr, forward in data
                saved = read_train_state(last_checkpoint)
                restored = _loop_state(saved["loop"])
                if not guard.rolled_back(restored.guard):
                    raise Evo2Error(
                        f"training diverged: {job.guard.max_bad_steps} bad steps in a row after "
                        f"{job.guard.max_rollbacks} rollback(s); lower optim.lr, check the data, or run "
                        f"`evo2 diagnose-grads`. Last good checkpoint: {last_checkpoint}"
                    )
                _load_weights(model, last_checkpoint, fsdp, holds_base)
                _load_optimizer(model, optimizer, saved["optimizer"], fsdp)
                position, tokens = state.data_position, state.tokens_seen
                state = replace(restored, data_position=position, tokens_seen=tokens, guard=guard.state)
                scale = guard.state.lr_scale
                say(f"[yellow]rolled back to {last_checkpoint} (step {state.step}); lr x{scale:.3g}[/]")
                continue

            # ---- log
            if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps:
                step_seconds = timed_seconds / max(1, timed_steps) if timed_steps else math.nan
                record = {
                    "kind": "train",
                    "step": state.step,
                    "loss": info.loss,
                    **objective.train_metrics(totals[1:-1]),
                    "lr": lr,
                    "grad_norm": info.grad_norm,
                    "tokens_seen": state.tokens_seen,
                    "tokens_per_s": tokens_per_step / step_seconds,
                    "mfu": train_flops_per_step / step_seconds / (device_peak.flops * runtime.world_size),
                    "eta_s": step_seconds * (cfg.max_steps - state.step),
                    "skipped": not info.verdict.apply_step,
                }
                if log is not None:
                    log.write(record)
                say(progress_line(record, cfg.max_steps))
                timed_seconds, timed_steps = 0.0, 0

            # ---- evaluate (keeping the best), stop early or on a signal, save
            improved, stop = False, totals[-1].item() > 0
            if stop:
                stop_reason = "signal"
            due = cfg.eval_interval and state.step % cfg.eval_interval == 0
            if objective.evaluates and (due or state.step == cfg.max_steps):
                last_val = objective.evaluate(wrapped, cfg.micro_batch, runtime)
                improved = last_val["val_loss"] < state.best_val_loss
                if improved:
                    state.best_val_loss, state.evals_without_improvement = last_val["val_loss"], 0
                else:
                    state.evals_without_improvement += 1
                if log is not None:
                    log.write({"kind": "val", "step": state.step, **last_val})
                say(f"  {objective.describe(last_val)}{' (best)' if improved else ''}")
                patience = cfg.early_stopping_patience
                if patience and state.evals_without_improvement >= patience and not stop:
                    stop_reason, stop = "early_stopping", True
            due = cfg.save_interval > 0 and state.step % cfg.save_interval == 0
            if improved or due or stop or state.step == cfg.max_steps:
                metrics = {"loss": info.loss, **(last_val or {})}
                last_checkpoint = save(is_best=improved, metrics=metrics)
                say(f"  saved {last_checkpoint}")
            if stop:
                say(
                    f"stopping at step {state.step} ({stop_reason.replace('_', ' ')}); "
                    "resume with the same command"
                )
                break

        if log is not None:
            log.close()
        return TrainResult(
            Path(cfg.run_dir),
            last_checkpoint,
            best_checkpoint(cfg.run_dir),
            state.step,
            stop_reason,
            runtime.is_main,
            last_val,
            losses,
        )
    finally:
        if watch is not None:
            watch.close()  # a caller's model leaves without our hooks
        wrapped = None  # DDP's reducer must be gone before its process group, also when unwinding an error
        stop_runtime(runtime)
        signals.close()


# ---------------------------------------------------------------- helpers of the loop


def _quiet(*args, **kwargs) -> None:
    """Ranks other than 0 print nothing."""


def micro_batches_per_process(global_batch: int, micro_batch: int, world_size: int) -> int:
    """How many micro-batches each process runs per step; the global batch must split evenly over them."""
    micro_batches = global_batch // micro_batch  # the config checked that micro_batch divides it
    if micro_batches % world_size:
        raise InputError(
            f"optim.global_batch={global_batch} is not a multiple of train.micro_batch x processes = "
            f"{micro_batch} x {world_size}; change one of them"
        )
    return micro_batches // world_size


def _language_model(job: TrainJob, say: Callable[[str], None]) -> LanguageModel:
    """The windows of `job.data` (validation ones when evaluating), opened before anything is written."""
    data, seed = job.data, job.train.seed
    train_windows, val_windows = split_windows(data, "train", seed), None
    if data.val_windows and job.train.eval_interval:
        val_windows, without_val = validation_windows(data, seed)
        if without_val:
            say(f"[yellow]warning: {escape(no_val_message(without_val, val_windows is not None))}[/]")
    return LanguageModel(train_windows, val_windows, data.val_windows, dataset_identity(data))


def _loop_state(saved: dict) -> LoopState:
    return LoopState(**{**saved, "guard": GuardState(**saved["guard"])})


@contextlib.contextmanager
def _stop_on_signals(announce: bool) -> Iterator[threading.Event]:
    """SIGTERM / SIGUSR1 / a first Ctrl-C set an event; the loop saves a checkpoint at the end of the step and
    returns. A second Ctrl-C aborts at once (the last saved checkpoint stays). Only an `announce`ing process
    (rank 0) says so: a Ctrl-C in the terminal reaches every process of a torchrun."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def on_interrupt(signum, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        if announce:
            print(
                "\nstopping after this step and saving a checkpoint; Ctrl-C again to abort", file=sys.stderr
            )

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_interrupt)}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, lambda signum, frame: requested.set())
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _load_weights(model: nn.Module, directory: Path, fsdp: bool = False, holds_base: bool = False) -> None:
    if not fsdp:
        load_weights_into(model, directory, holds_base=holds_base)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = read_weights(directory, None)  # a rollback: a checkpoint of this run, of this model
    partial = read_meta(directory).get(BASE) is not None  # trained tensors only: the base stays as it is
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=not partial))


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, fsdp: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=fsdp))


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0; empty on the other ranks. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded, on CPU (rank 0): loadable on any process count."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    fresh = not optimizer.state
    state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if fresh:
        # torch fills an empty optimizer's state with one zero-gradient step at lr 0. Moments stay zero, but
        # AdamW's step counter says 1, so the first real update's bias correction would make it 0.73 x lr.
        # Only rank 0 receives the full state (the others get an empty dict).
        for saved in (*optimizer.state.values(), *state.get("state", {}).values()):
            saved["step"].zero_()
    return state


def _non_finite_tensors(tree, prefix: str = "") -> list[str]:
    if isinstance(tree, torch.Tensor):
        return [] if not tree.is_floating_point() or all_finite(tree) else [prefix]
    if isinstance(tree, dict):
        return [
            n for k, v in tree.items() for n in _non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in _non_finite_tensors(v, f"{prefix}.{i}")]
    return []


def _describe_bad_step(
    step: int,
    verdict: Verdict,
    loss: float,
    grad_norm: float,
    model: nn.Module,
    watch: StepWatch,
    seq_len: int,
) -> list[str]:
    """A line on where a bad step started (train/origin.py's rule) or, for a spike, which layers carried it;
    then detail lines: the non-finite gradients (a few names), any hcl layer whose poles have crossed to
    lambda >= 0. Collective under FSDP."""
    norms = {
        name: full_tensor(p.grad).float().norm().item()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    poles = hcl_stats(model, seq_len)
    head = f"[yellow]step {step + 1}: {verdict.problem} (loss {loss:.4g}, grad norm {grad_norm:.4g}"
    head += f", threshold {verdict.threshold:.4g})" if verdict.threshold is not None else ")"
    head += ", step skipped" if not verdict.apply_step else ", step applied"
    lines = []
    if verdict.problem == "non-finite":
        bad = watch.in_backward_order([name for name, norm in norms.items() if not math.isfinite(norm)])
        site = watch.first_nonfinite_site()
        if site is not None:
            where = f"layer {site.layer} ({site.block})" if site.layer is not None else site.name
            stats = poles.get(site.layer) if site.block == "hcl" and site.role == "mixer" else None
            if stats is not None and stats.overflows(seq_len):
                cause = f"started in {where}: {hcl_overflow_detail(site.layer, stats, seq_len)}"
            elif stats is not None:  # h itself finite, the convolution's sums overflowed
                cause = (
                    f"started in {where}: the forward output of {site.name} went non-finite; its filter h "
                    f"reaches {stats.max_abs_h:.3g} (max lambda {stats.max_lambda:.4g} x (L - 1) = "
                    f"{stats.max_lambda * (seq_len - 1):.4g}; fp32 ends at exp({FP32_EXP_LIMIT:.1f}))"
                )
            else:
                cause = f"started in {where}: the forward output of {site.name} went non-finite"
        elif bad:
            cause = f"started at {bad[0]}, the first non-finite gradient in backward order"
        else:
            cause = "the loss is non-finite, every gradient is finite"
        lines.append(f"{head}; {cause}; {len(bad)} non-finite gradient(s)[/]")
        if bad:
            names = ", ".join(bad[:4]) + (f", ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
            lines.append(f"  non-finite gradients in {len(bad)} parameter(s), backward order: {names}")
    else:
        by_layer: dict[str, float] = {}
        for info in filter(lambda info: info.name in norms, watch.params):  # layers as origin.py reads them
            layer = f"blocks.{info.layer}" if info.layer is not None else info.name.split(".")[0]
            by_layer[layer] = by_layer.get(layer, 0.0) + norms[info.name] ** 2
        top = sorted(by_layer.items(), key=lambda item: -item[1])[:5]
        largest = ", ".join(f"{layer} {math.sqrt(sq):.3g}" for layer, sq in top)
        lines.append(f"{head}; largest gradients: {largest}[/]")
    bound = FP32_EXP_LIMIT / (seq_len - 1)
    for layer, stats in poles.items():
        if stats.nonneg:
            lines.append(
                f"  hcl layer {layer}: {stats.nonneg} pole(s) with lambda >= 0, largest "
                f"{stats.max_lambda:.4g} against the fp32 overflow bound {FP32_EXP_LIMIT:.1f}/(L-1) = "
                f"{bound:.4g} at L={seq_len}; `model.hcl_form: modal` keeps every lambda < 0"
            )
    return lines


def _check_made_by(start: Path, saved: dict, kind: str) -> None:
    """A checkpoint resumes only the kind of run that made it (a language model, or a head of this task) and
    only with this loop's training state (not that of the one-process head trainer of earlier versions)."""
    made_by = (read_meta(start).get("task") or {}).get("kind", "lm")
    if made_by == kind and "guard" in saved["loop"]:
        return
    trains = {"lm": "a language model", "classify": "a classify head", "regress": "a regress head"}
    by = "the one-process head trainer of an earlier version"
    if made_by != kind:
        by = f"a run training {trains.get(made_by, made_by)}"
    raise InputError(
        f"cannot resume from {start}: it was made by {by} and this run trains {trains.get(kind, kind)}; "
        "resume from a checkpoint of this kind of run, or use a new train.run_dir"
    )


def _check_data_identity(
    saved: dict | None, current: dict, start: Path, allow_change: bool, say: Callable[[str], None]
) -> None:
    """A resume continues exactly only on the data the checkpoint was trained on (checkpoints written
    before the data identity was recorded pass, as do objectives without one)."""
    changes = dataset_changes(saved, current) if saved is not None and current is not None else []
    if not changes:
        return
    if not allow_change:
        raise InputError(
            f"the data changed since checkpoint {start}: {'; '.join(changes)}. Resume with the data it "
            "was trained on, or pass --allow-data-change to continue on the new data (not an exact resume)"
        )
    say(f"[yellow]the data changed since the checkpoint ({'; '.join(changes)}); continuing on it[/]")


def _refuse_non_finite(step: int, weights: dict, train_state: dict, run_dir: Path) -> None:
    """A checkpoint never holds a NaN or an inf."""
    bad = _non_finite_tensors(weights) + _non_finite_tensors(train_state["optimizer"], "optimizer")
    if bad:
        raise Evo2Error(
            f"refusing to save step {step}: non-finite values in {', '.join(bad[:8])}; the latest checkpoint "
            f"in {run_dir}/checkpoints is the last good one"
        )
