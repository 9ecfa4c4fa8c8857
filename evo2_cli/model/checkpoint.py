"""Our checkpoint directory: one implementation for train, finetune, infer and convert.

A checkpoint is a directory that rebuilds the model from its own files alone:

    model.safetensors   the model's state dict (fp32 unless saved otherwise), names as in `StripedHyena`
    config.yaml         the full config; its `model:` section is the ModelConfig (other sections ignored here)
    meta.json           {"format": "evo2-cli-checkpoint", "version": 1, "parameters": N,
                         "files": {name: sha256}, ...the caller's fields (step, tokens, metrics)}

The training loop may add files (optimizer state, RNG state): `write_model_files` writes the three files
into a directory the caller manages (for example an `atomic_output_dir`), `save_model` writes a whole
directory atomically. `load_model` also follows a `latest` pointer (a symlink, or a file naming a
directory).

Tensors are read with safetensors only; every problem (missing or unexpected key, wrong shape, non-finite
value, unreadable file) is a `CheckpointError`, which is both an `InputError` (exit 2) and a `ValueError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_cli.config import to_dict
from evo2_cli.errors import InputError
from evo2_cli.fsio import (
    atomic_output_dir,
    atomic_path,
    atomic_write_text,
    directory_kind,
    json_listing,
    sha256_file,
)
from evo2_cli.model.config import ModelConfig, load_model_config
from evo2_cli.model.model import StripedHyena

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
FORMAT_NAME = "evo2-cli-checkpoint"
# What `--overwrite` of convert / finetune merge may replace (training step directories are ones too).
CHECKPOINT_DIR = directory_kind(
    "a checkpoint directory",
    META_FILE,
    json_listing(META_FILE, lambda meta: meta.get("format") == FORMAT_NAME),
)


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


# ---------------------------------------------------------------- validation shared with vortex.py


def all_finite(value: Tensor) -> bool:
    """No NaN and no inf in `value`. min and max are NaN or +-inf as soon as one value is: one read of the
    tensor without a temporary of its size, ~10x faster on CPU than `torch.isfinite(value).all()`."""
    if value.numel() == 0 or value.device.type == "meta":
        return True
    low, high = torch.aminmax(value)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_tensors(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    hint: str = "",
    finite: bool = True,
) -> None:
    """Raise CheckpointError unless `tensors` has exactly the keys and shapes of `expected`, all finite
    (`finite=False` skips the value check, for tensors derived from already checked ones)."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    suffix = f"\n  hint: {hint}" if hint else ""
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing key(s) {', '.join(missing[:5])}{more}{suffix}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source}: unexpected key(s) {', '.join(unexpected[:5])}{more}{suffix}")
    for key, shape in expected.items():
        value = tensors[key]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: key '{key}' holds a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: key '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}{suffix}"
            )
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: key '{key}' has dtype {value.dtype}, expected a float tensor")
        if finite and not all_finite(value):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: key '{key}' has {bad} non-finite value(s) (NaN or inf)")


def build_model(config: ModelConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None):
    """A StripedHyena whose parameters are the given (already validated) tensors, without a random init."""
    with torch.device("meta"):
        model = StripedHyena(config)
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = StripedHyena(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- save


def _config_yaml(model: StripedHyena, config: Any | None) -> str:
    from evo2_cli.config import to_yaml

    sections = dict(to_dict(config)) if config is not None else {}
    sections["model"] = to_dict(model.config)
    return to_yaml(sections)


def write_model_files(
    model: StripedHyena,
    directory: str | Path,
    *,
    config: Any | None = None,
    meta: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Write model.safetensors, config.yaml and meta.json into an existing `directory` (each file atomically).

    `config`: the full job config (a root dataclass or a mapping) whose `model:` section is replaced by the
    model's own config; other sections are kept as given. `meta`: extra fields for meta.json. Returns the
    sha256 of each file written before meta.json.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    # save_file streams the tensors into the file; `save` would build the whole file as bytes first (twice
    # the weights in RAM: 9 GiB for evo2-1b in fp32).
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_FILE, _config_yaml(model, config))
    files = {name: sha256_file(directory / name) for name in (WEIGHTS_FILE, CONFIG_FILE)}
    record = {
        "format": FORMAT_NAME,
        "version": 1,
        "parameters": model.num_parameters(),
        "hcl_form": model.config.hcl_form,
        **dict(meta or {}),
        "files": {**dict((meta or {}).get("files", {})), **files},
    }
    atomic_write_text(directory / META_FILE, json.dumps(record, indent=1, sort_keys=False) + "\n")
    return files


def save_model(
    model: StripedHyena,
    directory: str | Path,
    *,
    config: Any | None = None,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a temporary sibling renamed into place)."""
    with atomic_output_dir(Path(directory), CHECKPOINT_DIR, overwrite=overwrite) as tmp:
        write_model_files(model, tmp, config=config, meta=meta, dtype=dtype)
    return Path(directory)


# ---------------------------------------------------------------- load


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory for `path`: the directory itself, its `latest` pointer, or the parent of a
    `model.safetensors` file."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        return path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    if not (path / WEIGHTS_FILE).exists() and (path / "latest").exists():
        latest = path / "latest"
        if latest.is_symlink():
            return resolve_checkpoint_dir(latest.resolve())
        try:
            target = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{latest}: not a readable pointer (a symlink, or a file naming a checkpoint directory): "
                f"{exc}"
            ) from None
        return resolve_checkpoint_dir(path / target)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a checkpoint directory, {name} is missing")
    return path


def load_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (its config.yaml `model:` section)."""
    directory = resolve_checkpoint_dir(path)
    return load_model_config(directory / CONFIG_FILE)


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> StripedHyena:
    """Rebuild the model of a checkpoint directory from its own files (strict keys, shapes, finite values)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_checkpoint_dir(path)
    config = load_model_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    try:
        tensors = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read: {exc}") from None
    check_tensors(
        tensors,
        expected_shapes(config),
        str(weights),
        hint=f"the weights do not match the model section of {directory / CONFIG_FILE}",
    )
    return build_model(config, tensors, dtype)
