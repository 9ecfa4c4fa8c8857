"""One way to get a model from whatever the user pointed at: `load_inference_model`.

Accepted sources (first match wins):

- a Vortex / Evo 2 `.pt` file, together with `vortex_config` (its model YAML, release schema or ours);
- one of our checkpoint directories (model.safetensors + config.yaml), or its `model.safetensors` file;
- a directory holding a `latest` pointer to such a directory;
- a training run directory (RUN_DIR/checkpoints/...): its `latest` checkpoint, else the newest complete one.

Every `evo2 infer` subcommand uses this function, and finetune resolves its starting point with
`resolve_checkpoint`; device and dtype names are parsed here too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evo2_cli.errors import InputError
from evo2_cli.model.config import ModelConfig, load_model_config
from evo2_cli.model.model import StripedHyena, is_filter_parameter

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'; InputError when unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device: unsupported device type {device.type!r}; use cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 on CPU (bf16 matmuls are slower than fp32 on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype: expected auto, fp32, bf16 or fp16, got {name!r}")
    return DTYPES[name]


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` designates (see module docstring), its `latest` pointer followed;
    Vortex `.pt` files are returned unchanged. InputError when nothing loadable is there.

    A training run directory is the one source the model package cannot resolve (it knows nothing of runs);
    everything else goes through `resolve_checkpoint_dir`."""
    from evo2_cli.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, resolve_checkpoint_dir

    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{path}: model not found (expected a checkpoint directory, a run directory or a .pt)"
        )
    if path.is_file() and path.suffix != ".safetensors":
        return path
    if path.is_dir() and not (path / WEIGHTS_FILE).exists() and not (path / "latest").exists():
        if not (path / "checkpoints").is_dir():
            raise InputError(
                f"{path}: not a checkpoint directory ({WEIGHTS_FILE} and {CONFIG_FILE}), a run directory "
                "(checkpoints/) or a Vortex .pt file"
            )
        from evo2_cli.train.checkpoint import latest_checkpoint

        found = latest_checkpoint(path)
        if found is None:
            raise InputError(f"{path}: a training run directory without any complete checkpoint yet")
        path = found
    return resolve_checkpoint_dir(path)


def load_inference_model(
    path: str | Path,
    vortex_config: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    hcl_form: str | None = None,
    clamp_poles: float | None = None,
    verify: bool = True,
) -> StripedHyena:
    """The model at `path` (see module docstring) on `device` in `dtype` (hyena filter parameters stay fp32),
    in eval mode, gradients off.

    `vortex_config` is required for a Vortex `.pt` and refused for our checkpoints (they carry their own
    config). `hcl_form` / `clamp_poles` apply to Vortex imports (see `evo2_cli.model.vortex.load_vortex`).
    A checkpoint whose tensors do not match its config is an InputError (exit 2) naming the key, and so is
    one whose files do not match the sha256 in its meta.json, unless `verify` is False (--no-verify).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    source = resolve_checkpoint(Path(path))
    if source.is_file():
        if vortex_config is None:
            raise InputError(
                f"{source}: a Vortex-layout .pt needs its model config YAML: pass --vortex-config FILE"
            )
        from evo2_cli.model.vortex import load_vortex

        model = load_vortex(vortex_config, source, hcl_form=hcl_form, clamp_poles=clamp_poles)
    else:
        if vortex_config is not None:
            raise InputError(
                f"{source}: --vortex-config is only for Vortex .pt files; our checkpoints carry their config"
            )
        if clamp_poles is not None:  # a checkpoint of ours loads as saved; it would be silently ignored
            raise InputError(f"{source}: --clamp-poles is only for Vortex .pt files; drop it")
        from evo2_cli.model.checkpoint import load_model

        model = load_model(source, verify=verify)
    return prepare_for_inference(model, device, dtype)


def prepare_for_inference(model: StripedHyena, device: torch.device, dtype: torch.dtype) -> StripedHyena:
    """`model` on `device` in `dtype` except its hyena filter parameters, in eval mode, gradients off."""
    model = model.to(device=device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Hyena filters stay fp32 (the operators compute in fp32 anyway; bf16 poles would shift the
            # decay rates of slow modes), as in the released bf16 checkpoints.
            if not is_filter_parameter(name):
                parameter.data = parameter.data.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_inference_config(path: str | Path, vortex_config: str | Path | None = None) -> ModelConfig | None:
    """The ModelConfig `load_inference_model(path, vortex_config)` would build, read without the weights,
    so options that depend on the model's shape are checked before a long load; None for a Vortex .pt
    without its config (the loader explains)."""
    source = resolve_checkpoint(Path(path))
    if source.is_file():
        return None if vortex_config is None else load_model_config(vortex_config)
    from evo2_cli.model.checkpoint import load_checkpoint_config

    return load_checkpoint_config(source)
