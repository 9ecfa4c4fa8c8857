"""Run the variants of a diagnosis: K plain training steps each, with the recorder's hooks.

Every variant starts from the same weights (a fresh `model:` at `diagnose.seed`, or `diagnose.checkpoint`;
converted to the variant's hcl form exactly, and with the slow-mode init applied before the copy) and sees the
same windows (window i of step s is sample s * global_batch + i of the training stream at `diagnose.seed`).
A step is the training loop's own step (evo2_cli/train/step.py) without its guard, the recorder as its hooks:
forward and backward under the variant's precision (the weighted mean over the global batch), clip (when the
variant clips), AdamW step. Every step is applied, bad or not, as a training stack without a guard would; a
variant stops after the step whose loss or weights went non-finite.

Reused, not re-derived: the training windows and loss weighting (evo2_cli/train/data.py), the step
(evo2_cli/train/step.py), AdamW over the model package's weight-decay groups and the lr schedule
(evo2_cli/train/optim.py), the spike rule (evo2_cli/train/guard.py, through detect.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from evo2_cli.diagnose.config import DiagnoseJob, Variant
from evo2_cli.diagnose.detect import Explosion, locate_explosion
from evo2_cli.diagnose.record import Recorder, StepRecord
from evo2_cli.errors import InputError
from evo2_cli.model import ModelConfig, StripedHyena
from evo2_cli.model.checkpoint import build_model, meta_model
from evo2_cli.runtime import DTYPES, Runtime, choose_device
from evo2_cli.train.data import WindowSampler, split_windows
from evo2_cli.train.optim import build_optimizer, learning_rate
from evo2_cli.train.origin import ParamInfo, SiteInfo, hcl_stats
from evo2_cli.train.step import LanguageModel, StepInfo, TrainHooks, TrainStep


@dataclass
class VariantResult:
    variant: Variant
    params: list[ParamInfo]
    sites: list[SiteInfo]
    steps: list[StepRecord]
    explosion: Explosion | None
    stop_reason: str  # "steps" (ran them all) or "non-finite" (stopped after a non-finite loss or weights)
    seconds: float

    @property
    def healthy(self) -> bool:
        return self.explosion is None


@dataclass
class Diagnosis:
    job: DiagnoseJob
    model_config: ModelConfig
    source: str  # "preset <name>" / "model config" / the checkpoint path
    device: str
    seq_len: int
    variants: list[VariantResult]

    @property
    def healthy(self) -> bool:
        return all(v.healthy for v in self.variants)


# ---------------------------------------------------------------- the starting weights


@torch.no_grad()
def place_slow_modes(model: nn.Module, count: int, lam: float) -> int:
    """Move the `count` slowest poles (largest lambda) of every hcl channel to `lam` < 0, in the model's own
    parameterization (vortex: lambda itself; modal: p = log(-lam) - gamma, gamma kept). Returns the number
    of poles moved. Trained Evo 2 checkpoints hold such near-zero modes; the training-stack init does not."""
    if count <= 0:
        return 0
    moved = 0
    for block in model.blocks:
        if getattr(block, "kind", None) != "hcl":
            continue
        f = block.filter
        poles = f.poles()  # (D, S)
        slowest = poles.topk(count, dim=1).indices  # (D, count)
        mask = torch.zeros_like(poles, dtype=torch.bool).scatter_(1, slowest, True)
        if f.form == "modal":
            target = math.log(-lam) - f.gamma.float()
            f.p.copy_(torch.where(mask, target, f.p.float()).to(f.p.dtype))
        else:
            f.log_poles.copy_(torch.where(mask, torch.full_like(poles, lam), f.log_poles.float()))
        moved += int(mask.sum())
    return moved


def starting_model(job: DiagnoseJob, verify: bool = True) -> tuple[StripedHyena, str]:
    """The weights every variant starts from (CPU, fp32), and where they came from (a checkpoint of ours is
    checked against its sha256 unless `verify` is False)."""
    d = job.diagnose
    if d.checkpoint is not None:
        from evo2_cli.model.checkpoint import load_source, resolve_checkpoint

        # A Vortex .pt keeps its free poles as they are; each variant then converts to its own form.
        model = load_source(d.checkpoint, d.vortex_config, hcl_form="vortex", verify=verify)
        source = str(resolve_checkpoint(d.checkpoint))
        if d.slow_modes > model.config.state_size:
            raise InputError(
                f"diagnose.slow_modes={d.slow_modes} is more than the checkpoint's state_size "
                f"{model.config.state_size}"
            )
    else:
        torch.manual_seed(d.seed)
        model = StripedHyena(job.model)
        source = f"preset {job.model.preset}" if job.model.preset else "model config"
    place_slow_modes(model, d.slow_modes, d.slow_mode_lambda)
    return model.float(), source


def variant_model(base: StripedHyena, form: str) -> StripedHyena:
    """A copy of `base` with hcl form `form`; the same function (poles mapped exactly, as `evo2 convert`)."""
    from evo2_cli.model.vortex import state_dict_from_vortex, vortex_state_dict

    config = dataclasses.replace(base.config, hcl_form=form)
    state = base.state_dict()
    if form != base.config.hcl_form:
        state = state_dict_from_vortex(vortex_state_dict(base), config, source="the starting weights")
    return build_model(meta_model(config), {k: v.detach().clone() for k, v in state.items()})  # a copy


# ---------------------------------------------------------------- one variant


def run_variant(
    job: DiagnoseJob,
    variant: Variant,
    base: StripedHyena,
    windows: WindowSampler,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> VariantResult:
    d, seq_len = job.diagnose, job.data.seq_len
    optim = job.optim_for(variant)
    model = variant_model(base, variant.hcl_form).to(device)
    model.train()
    recorder = Recorder(model)
    seen = {}  # what the recorder saw of the step being taken

    def after_backward(info: StepInfo) -> None:
        seen["grad"] = recorder.gradients()
        recorder.before_update()  # clipping leaves the weights as they are

    def after_step(info: StepInfo) -> None:
        seen["update"] = recorder.after_update()

    optimizer, objective = build_optimizer(model, optim), LanguageModel(windows)
    runtime = Runtime(device, autocast_dtype=DTYPES[variant.precision])  # one process, no guard below
    parts = (model, optimizer, objective, runtime, variant.grad_clip)
    take_step = TrainStep(*parts, hooks=TrainHooks(after_backward, after_step))
    steps: list[StepRecord] = []
    stop_reason, started = "steps", time.perf_counter()
    try:
        for step in range(d.steps):
            hcl = hcl_stats(model, seq_len)  # the poles this step's forward uses
            recorder.start_step()
            first = step * optim.global_batch  # the training stream's windows, as the loop takes them
            micro = range(first, first + optim.global_batch, d.micro_batch)
            batches = [take_step.objective.batch(start, d.micro_batch, device) for start in micro]
            info, _ = take_step(step, learning_rate(step, optim, d.steps), batches)
            (grad, grad_bad), (param_norm, ratio, param_bad) = seen["grad"], seen["update"]
            record = StepRecord(
                step=step,
                lr=info.lr,
                loss=info.loss,
                grad_norm=info.grad_norm,
                grad=grad,
                grad_nonfinite=grad_bad,
                param_norm=param_norm,
                update_ratio=ratio,
                param_nonfinite=param_bad,
                activations=recorder.activations(),
                forward_order=list(recorder.forward_order),
                backward_order=list(recorder.backward_order),
                hcl=hcl,
            )
            steps.append(record)
            if progress is not None:
                progress(
                    f"{variant.name}: step {step + 1}/{d.steps} loss {record.loss:.4g} "
                    f"grad {record.grad_norm:.3g}"
                )
            if not math.isfinite(record.loss) or any(param_bad):
                stop_reason = "non-finite"
                break
    finally:
        recorder.close()
    explosion = locate_explosion(steps, recorder.params, recorder.sites, seq_len, d.detector())
    return VariantResult(
        variant, recorder.params, recorder.sites, steps, explosion, stop_reason, time.perf_counter() - started
    )


# ---------------------------------------------------------------- all variants


def run_diagnosis(
    job: DiagnoseJob, progress: Callable[[str], None] | None = None, verify: bool = True
) -> Diagnosis:
    """Every variant of `job`, one after the other, from the same weights and windows (`verify`: see
    `starting_model`)."""
    windows = split_windows(job.data, "train", job.diagnose.seed)  # dataset problems surface before training
    device = choose_device(job.diagnose.device, "diagnose.device")
    base, source = starting_model(job, verify)
    results = []
    for variant in job.variant_list(base.config.hcl_form):
        results.append(run_variant(job, variant, base, windows, device, progress))
    return Diagnosis(job, base.config, source, str(device), job.data.seq_len, results)
