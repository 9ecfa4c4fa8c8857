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

Every reader verifies what it reads against the sha256 in meta.json (`recorded_hashes`, `verified_read`,
`check_file`): a mismatch, or a checkpoint without hashes, is refused unless the caller passes
`verify=False` (the commands' --no-verify, for weights changed on purpose).

Tensors are read with safetensors or `torch.load(weights_only=True)` only (`load_tensor_file`); every problem
(corrupt file, missing or unexpected key, wrong shape, non-finite value, unreadable or pickled file) is a
`CheckpointError`, which is both an `InputError` (exit 2) and a `ValueError`.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
NO_VERIFY_HINT = "pass --no-verify only if you changed the files on purpose"

T = TypeVar("T")


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
    (`finite=False` skips the value check, for tensors derived from already checked ones). Mismatching
    keys and shapes are named in a few lines, the first three of each kind: a checkpoint of another model
    differs in hundreds."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    reshaped = [
        f"key '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k])}"
        for k, v in tensors.items()
        if k in expected and isinstance(v, Tensor) and tuple(v.shape) != tuple(expected[k])
    ]
    problems = [
        f"{label}{separator.join(items[:3])}{f' (and {len(items) - 3} more)' if len(items) > 3 else ''}"
        for label, items, separator in (
            ("missing key(s) ", missing, ", "),
            ("unexpected key(s) ", unexpected, ", "),
            ("", reshaped, "; "),
        )
        if items
    ]
    if problems:
        suffix = f"\n  hint: {hint}" if hint else ""
        if len(problems) == 1:
            raise CheckpointError(f"{source}: {problems[0]}{suffix}")
        listed = "".join(f"\n  {problem}" for problem in problems)
        raise CheckpointError(f"{source}: the tensors do not match the model:{listed}{suffix}")
    for key in expected:
        value = tensors[key]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: key '{key}' holds a {type(value).__name__}, not a tensor")
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


# ---------------------------------------------------------------- verification and reading


def recorded_hashes(directory: str | Path, verify: bool = True) -> dict[str, str] | None:
    """The sha256 of each file of checkpoint `directory` as its meta.json records them, or None when
    `verify` is False (nothing is checked). A checkpoint without them is refused: a corrupted file could not
    be told from a good one."""
    if not verify:
        return None
    meta_path = Path(directory) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        meta = {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc}); {NO_VERIFY_HINT}") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(
            f"{directory}: no sha256 of the checkpoint's files in {META_FILE}, so a corrupted file cannot "
            f"be detected; {NO_VERIFY_HINT}"
        )
    return files


def _expected_hash(path: Path, hashes: Mapping[str, str]) -> str:
    expected = hashes.get(path.name)
    if not isinstance(expected, str):
        raise CheckpointError(
            f"{path}: {path.parent / META_FILE} records no sha256 of this file, so it cannot be verified; "
            f"{NO_VERIFY_HINT}"
        )
    return expected


def _compare_hash(path: Path, expected: str, found: Callable[[], str]) -> None:
    try:
        digest = found()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if digest != expected:
        raise CheckpointError(
            f"{path}: corrupt: its sha256 does not match {META_FILE}\n  expected {expected}\n  found    "
            f"{digest}\n  restore the file from a copy or use another checkpoint (an earlier step_*); "
            f"{NO_VERIFY_HINT}"
        )


def check_file(path: str | Path, hashes: Mapping[str, str] | None) -> None:
    """Raise CheckpointError unless the file's sha256 is the one `hashes` records (None: not checked)."""
    path = Path(path)
    if hashes is not None:
        _compare_hash(path, _expected_hash(path, hashes), lambda: sha256_file(path))


def verified_read(path: str | Path, hashes: Mapping[str, str] | None, read: Callable[[Path], T]) -> T:
    """`read(path)`, the file's sha256 checked against `hashes` (None: not checked). The hash runs in a
    second thread while `read` reads the same file: the two share the page cache, so the file comes from
    disk once, and the read hides behind the hash (BENCHMARKS.md, "Checkpoint verification"). Reading
    the bytes once and handing them to safetensors' `load` holds the file twice in memory and is slower
    still (a one-off trial on evo2-1b: 20 s and 8.4 GiB peak, against 5.4 s and 4.3 GiB for hashing, then
    loading)."""
    path = Path(path)
    if hashes is None:
        return read(path)
    expected = _expected_hash(path, hashes)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, path)
        try:
            result = read(path)
        except Exception:
            # A corrupt file may fail to parse: name the corruption, the cause, rather than the symptom.
            _compare_hash(path, expected, digest.result)
            raise
        _compare_hash(path, expected, digest.result)
    return result


def _unpickle_refusal(exc: pickle.UnpicklingError) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return f" (it references {found.group(1)})" if found else ""


def load_tensor_file(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU: a file that would need code run to unpickle (any class
    but tensors, containers and numbers) is refused, never executed; every failure is a CheckpointError."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: not a tensor-only file; refusing to unpickle{_unpickle_refusal(exc)}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint: {exc}") from None


def read_weights(
    directory: str | Path,
    hashes: Mapping[str, str] | None,
    device: str | torch.device = "cpu",
    check: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """The tensors of DIRECTORY/model.safetensors, verified against `hashes` (None: not checked). `check`
    (for example `check_tensors`) runs while the file is hashed: safetensors maps the file, and a check
    that reads every value is where the bytes are actually read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read(path: Path) -> dict[str, Tensor]:
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read: {exc}") from None
        if check is not None:
            check(tensors)
        return tensors

    return verified_read(Path(directory) / WEIGHTS_FILE, hashes, read)


def load_weights_into(
    module: torch.nn.Module, directory: str | Path, device: str | torch.device = "cpu"
) -> None:
    """Load DIRECTORY/model.safetensors (verified by the caller) into `module`, keys and shapes compared
    first: a checkpoint of another model is named in a few lines, not torch's list of every key."""
    path = Path(directory) / WEIGHTS_FILE
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    hint = "the checkpoint holds another model than the configured one: resume from one of this model"
    check = lambda tensors: check_tensors(tensors, expected, str(path), hint=hint, finite=False)  # noqa: E731
    module.load_state_dict(read_weights(directory, None, device, check=check))


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


def load_checkpoint_config(path: str | Path, verify: bool = True) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (its config.yaml `model:` section), verified against
    meta.json unless `verify` is False."""
    directory = resolve_checkpoint_dir(path)
    check_file(directory / CONFIG_FILE, recorded_hashes(directory, verify))
    return load_model_config(directory / CONFIG_FILE)


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> StripedHyena:
    """Rebuild the model of a checkpoint directory from its own files (sha256 as in meta.json unless
    `verify` is False, strict keys, shapes, finite values)."""
    directory = resolve_checkpoint_dir(path)
    hashes = recorded_hashes(directory, verify)
    check_file(directory / CONFIG_FILE, hashes)
    config = load_model_config(directory / CONFIG_FILE)
    expected = expected_shapes(config)
    hint = f"the weights do not match the model section of {directory / CONFIG_FILE}"
    tensors = read_weights(
        directory,
        hashes,
        map_location,
        check=lambda tensors: check_tensors(tensors, expected, str(directory / WEIGHTS_FILE), hint=hint),
    )
    return build_model(config, tensors, dtype)
