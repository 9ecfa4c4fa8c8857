"""`evo2 finetune`: the training loop of `evo2 train`, started from a checkpoint, with adapters.

    prepare(job)      resolve the starting point, adapt a fake-tensor copy of the model (LoRA, freeze, head,
                      dtypes), estimate memory and refuse when it does not fit, then load the weights and
                      adapt them the same way; returns the model, the trainable names and the estimate
    finetune(job)     prepare, then the training loop (`train_prepared`): language modelling, or the objective
                      of heads.py (classify / regress); it resumes from the run directory
    load_finetuned(path)   a checkpoint written by finetune (plain, LoRA, or with a task head) as a model
    merge(path, out)  fold LoRA adapters into the weights and write a plain checkpoint directory (and
                      optionally a Vortex .pt + release YAML for the official engine)

The same code adapts the model whatever the starting point is: our checkpoint directory, a run directory
(its latest checkpoint) or a Vortex-layout `.pt` with its release config, tiny or `evo2-1b`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from evo2_cli.config import build_config, read_yaml, to_dict
from evo2_cli.console import make_console
from evo2_cli.errors import InputError
from evo2_cli.finetune.config import FinetuneJob, FinetuneSection
from evo2_cli.finetune.freeze import trainable_names
from evo2_cli.finetune.heads import HEAD_NAME, SequenceTask, attach_head, is_head_parameter
from evo2_cli.finetune.lora import LoRALinear, inject_lora, merge_lora
from evo2_cli.model import ModelConfig, StripedHyena, load_model_config
from evo2_cli.model.checkpoint import (
    CONFIG_FILE,
    base_reference,
    check_file,
    is_adapter_parameter,
    load_checkpoint_config,
    load_model,
    meta_model,
    read_meta,
    recorded_hashes,
    resolve_checkpoint,
    save_model,
    vortex_config_of,
    write_model_files,
)
from evo2_cli.model.vortex import export_vortex, load_vortex
from evo2_cli.train.data import split_windows
from evo2_cli.train.memory import MemoryEstimate, check_memory, estimate_memory, fake_mode

# ---------------------------------------------------------------- the starting point


@dataclass(frozen=True)
class StartingPoint:
    path: Path
    config: ModelConfig
    vortex_config: Path | None  # the release YAML of a Vortex .pt; None for our checkpoint directories
    verify: bool = True  # check our checkpoint's files against their sha256 (False: --no-verify)

    def load(self, clamp_poles: float | None = None) -> StripedHyena:
        """The weights in fp32 on CPU, in train mode (`adapt` sets the device's dtypes, the loop moves them).
        A LoRA checkpoint of ours is merged first, so a finetune can start from another one's result.
        Read with the model package directly: the inference loader's device move, eval mode and frozen
        gradients would all be undone here, and its move cannot take the shape-only (meta) checkpoints the
        model package accepts."""
        if self.vortex_config is not None:
            return load_vortex(self.config, self.path, clamp_poles=clamp_poles).train()
        model = load_finetuned(self.path, self.verify)
        if hasattr(model, HEAD_NAME):
            raise InputError(
                f"{self.path}: holds a task head; start from the backbone checkpoint it was trained from, "
                "or continue its run with the same train.run_dir (resume)"
            )
        merge_lora(model)
        return model.train()

    def reference(self, clamp_poles: float | None = None) -> dict:
        """The meta.json `base` of this run's checkpoints when they hold only the trained tensors: this
        starting point's path and sha256; a LoRA checkpoint's adapters are folded in when it is read back,
        as `load` merges them."""
        if self.vortex_config is not None:
            return base_reference(self.path, vortex=True, clamp_poles=clamp_poles)
        section = read_finetune_section(self.path)
        lora = section.lora if section is not None and section.method == "lora" else None
        scaling = lora.alpha / lora.rank if lora is not None else None
        return base_reference(self.path, verify=self.verify, lora_scaling=scaling)


def resolve_start(section: FinetuneSection, verify: bool = True) -> StartingPoint:
    """Read the starting point's model config without loading its weights (`verify`: see StartingPoint)."""
    path = section.init_from
    if path is None:
        raise InputError(
            "finetune.init_from is not set: pass --from (or --set finetune.init_from=...) with a checkpoint "
            "directory, a run directory, or an Evo 2 / Vortex .pt"
        )
    if path.suffix in (".yaml", ".yml"):
        raise InputError(
            f"{path}: --from takes the weights (a checkpoint directory, a run directory or a Vortex .pt); a "
            "release config YAML goes to --init-config"
        )
    if path.is_file() and path.suffix != ".safetensors":
        config_path = vortex_config_of(path, section.init_config, "set finetune.init_config (--init-config)")
        return StartingPoint(path, load_model_config(config_path), config_path)
    path = resolve_checkpoint(path, vortex=False)
    if section.init_config is not None:
        raise InputError(
            f"finetune.init_config is only for a Vortex .pt; {path} is a checkpoint directory whose own "
            "config.yaml describes the model"
        )
    return StartingPoint(path, load_checkpoint_config(path, verify), None, verify)


def model_config_for(job: FinetuneJob, start: StartingPoint) -> ModelConfig:
    """The model section of the run: the checkpoint's; a given `model:` section must agree with it."""
    if job.model is not None and to_dict(job.model) != to_dict(start.config):
        ours, theirs = to_dict(job.model), to_dict(start.config)
        keys = [k for k in theirs if ours.get(k) != theirs.get(k)]
        diffs = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys[:4])
        raise InputError(
            f"the model section does not match the starting checkpoint {start.path} ({diffs}); the model "
            "comes from the checkpoint: remove the model section, or point finetune.init_from at a "
            "checkpoint of that model"
        )
    return start.config


# ---------------------------------------------------------------- adapting a model


def adapt(
    model: StripedHyena, job: FinetuneJob, low_precision: bool, outputs: int = 0
) -> tuple[StripedHyena, set[str]]:
    """Add the task head (`outputs` > 0), the LoRA adapters, mark the trainable parameters, and on CUDA
    hold frozen matmul weights in bf16 (filters, norms, embedding and trainable weights stay fp32).
    The same function runs on the fake-tensor copy (for the memory estimate) and on the real weights."""
    section = job.finetune
    if outputs:
        attach_head(model, outputs, seed=job.train.seed)
    if section.method == "lora":
        inject_lora(model, section.lora, seed=job.train.seed)
    trainable = trainable_names(model, section.method, section.freeze, is_head_parameter if outputs else None)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    if low_precision:
        for module in model.modules():
            if isinstance(module, (nn.Linear, LoRALinear)) and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(torch.bfloat16)
    return model, trainable


def _low_precision(job: FinetuneJob, device: torch.device) -> bool:
    return device.type == "cuda" and job.train.precision != "fp32"


@dataclass
class Prepared:
    job: FinetuneJob  # with the model section filled in from the starting point
    model: StripedHyena
    trainable: set[str]
    estimate: MemoryEstimate
    device: torch.device
    # The starting point, for checkpoints that hold only the trained tensors (None: everything trains).
    base: dict | None = None

    def write_model_files(self, model: nn.Module, directory: Path, **kwargs) -> None:
        """The model package's `write_model_files` for this run's checkpoints: fp32 (frozen weights may be
        bf16 on CUDA), and only the trained tensors beside a reference to the base when some are frozen."""
        trained = self.trainable if self.base is not None else None
        write_model_files(model, directory, dtype=torch.float32, trained=trained, base=self.base, **kwargs)


def prepare(
    job: FinetuneJob, outputs: int = 0, console: Console | None = None, verify: bool = True
) -> Prepared:
    """Resolve, estimate (on a fake-tensor model), refuse when it does not fit, then load and adapt
    (`verify`: check a checkpoint of ours against its sha256)."""
    from evo2_cli.runtime import choose_device
    from evo2_cli.train.distributed import torchrun_rank

    rank, processes = torchrun_rank()
    say = console.print if console is not None and rank == 0 else (lambda *a, **k: None)
    start = resolve_start(job.finetune, verify)
    config = model_config_for(job, start)
    job = dataclasses.replace(job, model=config)
    device = choose_device(job.train.device, "train.device")
    low_precision = _low_precision(job, device)
    with fake_mode():
        skeleton, _ = adapt(StripedHyena(config), job, low_precision, outputs)
        estimate = estimate_memory(
            skeleton,
            job.train.micro_batch,
            job.data.seq_len,
            bf16_autocast=low_precision,
            activation_checkpointing=job.train.activation_checkpointing,
            is_adapter=is_adapter_parameter,
            processes=processes,
            parallelism=job.train.parallelism,
        )
    say(
        f"finetune ({job.finetune.method}, task {job.finetune.task}) from {start.path}: {estimate.describe()}"
    )
    fix = (
        "Use method: lora (fewer trainable parameters), freeze more (finetune.freeze), run N processes "
        "with train.parallelism: fsdp (the weights are then split N ways), or a bigger device"
    )
    check_memory(estimate, device, job.train.memory_limit_gb, subject="this finetune", static_fix=fix)
    model, trainable = adapt(start.load(job.finetune.clamp_poles), job, low_precision, outputs)
    frozen = set(model.state_dict()) - trainable
    base = start.reference(job.finetune.clamp_poles) if frozen else None
    return Prepared(job, model, trainable, estimate, device, base)


# ---------------------------------------------------------------- running


def finetune(
    job: FinetuneJob,
    *,
    resume: str = "auto",
    overwrite: bool = False,
    allow_data_change: bool = False,
    verify: bool = True,
    hooks=None,
    console: Console | None = None,
):
    """Run a finetune (see the module docstring); returns the loop's TrainResult. `hooks` (a
    train.step.TrainHooks) and `allow_data_change` reach the loop; `verify` False (--no-verify) reads the
    starting and resumed checkpoints without checking their sha256."""
    console = console or make_console()
    objective = None
    if job.finetune.task == "lm":
        # A dataset problem fails before the weights load (minutes for a large model); the loop reopens it.
        split_windows(job.data, "train", job.train.seed)
    else:
        from evo2_cli.train.distributed import torchrun_rank

        objective = SequenceTask(job)  # bad labels fail before the weights load
        if torchrun_rank()[0] == 0:
            console.print(objective.summary(), highlight=False, soft_wrap=True)
    return train_prepared(
        prepare(job, objective.outputs if objective else 0, console=console, verify=verify),
        objective=objective,
        resume=resume,
        overwrite=overwrite,
        allow_data_change=allow_data_change,
        verify=verify,
        hooks=hooks,
        console=console,
    )


def train_prepared(prepared: Prepared, *, objective=None, **options):
    """The training loop on a prepared model (`finetune` = `prepare` + this): language modelling, or the
    `objective` of a head (heads.py `SequenceTask`); `options` are the loop's (resume, hooks, console...)."""
    from evo2_cli.train.loop import train

    return train(
        prepared.job,
        model=prepared.model,
        trainable=lambda name, param: name in prepared.trainable,
        write_model_files=prepared.write_model_files,
        objective=objective,
        **options,
    )


# ---------------------------------------------------------------- reading results back


def read_finetune_section(directory: Path) -> FinetuneSection | None:
    """The `finetune:` section of a checkpoint's config.yaml (None for a checkpoint of `evo2 train`)."""
    raw, _ = read_yaml(directory / CONFIG_FILE)
    if "finetune" not in raw:
        return None
    return build_config(FinetuneSection, raw["finetune"] or {}, name=str(directory / CONFIG_FILE))


def load_finetuned(path: str | Path, verify: bool = True) -> StripedHyena:
    """Any checkpoint directory of ours as a model: plain (as `load_model`), with LoRA adapters, or with a
    task head (`model.task_head`, its classes in `model.task_classes`), rebuilt from its own files, checked
    against their sha256 unless `verify` is False."""
    directory = resolve_checkpoint(path, vortex=False)
    check_file(directory / CONFIG_FILE, recorded_hashes(directory, verify))
    section = read_finetune_section(directory)
    task = read_meta(directory).get("task") or {}
    if section is None or (section.method != "lora" and not task):
        return load_model(directory, verify=verify)
    model = meta_model(load_model_config(directory / CONFIG_FILE))
    with torch.device("meta"):
        if task:
            attach_head(model, int(task["outputs"]))
        if section.method == "lora":
            inject_lora(model, section.lora)
    model = load_model(directory, verify=verify, model=model)
    if task:
        model.task_classes = task.get("classes")
    return model


def merge(
    path: str | Path,
    out: str | Path,
    *,
    vortex: str | Path | None = None,
    vortex_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> tuple[StripedHyena, int]:
    """Fold the LoRA adapters of checkpoint `path` into its weights and write a plain checkpoint directory
    `out` (loadable by `load_model`); with `vortex`, also export it as a Vortex .pt + release YAML.
    Returns the merged model and how many layers were merged (0 for a checkpoint without adapters).
    The source is checked against its sha256 first (unless `verify` is False): the output's fresh hashes
    must never vouch for corrupted weights."""
    directory = resolve_checkpoint(path, vortex=False)
    model = load_finetuned(directory, verify)
    if hasattr(model, HEAD_NAME):
        raise InputError(
            f"{directory}: holds a {read_meta(directory)['task']['kind']} head; "
            "merge writes plain language-model checkpoints"
        )
    merged = merge_lora(model)
    meta = {"merged_from": str(directory), "merged_lora_layers": merged}
    save_model(model, out, meta=meta, overwrite=overwrite)
    if vortex is not None:
        vortex = Path(vortex)
        export_vortex(
            model, vortex, Path(vortex_config) if vortex_config else vortex.with_suffix(".yml"), dtype
        )
    return model, merged
