"""Our checkpoint directory: one implementation for train, finetune, infer and convert.

A checkpoint is a directory that rebuilds the model from its own files alone:

    model.safetensors   the model's state dict (fp32 unless saved otherwise), names as in `StripedHyena`
    config.yaml         the full config; its `model:` section is the ModelConfig (other sections ignored here)
    meta.json           {"format": "evo2-cli-checkpoint", "version": 1, "parameters": N,
                         "files": {name: sha256}, ...the caller's fields (step, tokens, metrics)}

A finetune that trains only some tensors (LoRA adapters, a task head, unfrozen parts) writes only those
(`write_model_files(..., trained=names, base=reference)`): meta.json's `base` then names the starting point
the other tensors come from (`base_reference`: its path as given, its absolute path and the sha256 of its
weight files) and every reader here rebuilds base + trained tensors (`read_checkpoint_tensors`), after
checking the base against those sha256 (`check_base`).

The training loop may add files (optimizer state, RNG state): `write_model_files` writes the three files
into a directory the caller manages (for example an `atomic_output_dir`), `save_model` writes a whole
directory atomically. `resolve_checkpoint` says which checkpoint a path means; `load_source` loads any.

Every reader verifies what it reads against the sha256 in meta.json (`recorded_hashes`, `verified_read`,
`check_file`): a mismatch, or a checkpoint without hashes, is refused unless the caller passes
`verify=False` (the commands' --no-verify, for weights changed on purpose).

Tensors are read with safetensors or `torch.load(weights_only=True)` only (`load_tensor_file`); every problem
(corrupt file, missing or unexpected key, wrong shape, non-finite value, unreadable or pickled file) is a
`CheckpointError`, which is both an `InputError` (exit 2) and a `ValueError`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from evo2_cli.config import to_dict, to_yaml
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
BASE = "base"  # meta.json: the checkpoint holds only the trained tensors; the others come from this base
# A training run directory: RUN_DIR/checkpoints/step_00000100/ (one checkpoint per save), and the pointers
# checkpoints/latest and checkpoints/best (symlinks to a step directory).
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"

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


def meta_model(config: ModelConfig) -> StripedHyena:
    """A StripedHyena without storage: its shapes, or a model for `build_model` to fill (no random init)."""
    with torch.device("meta"):
        return StripedHyena(config)


def build_model(model: StripedHyena, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None):
    """`meta_model`'s `model` with the given (already validated) tensors as its parameters."""
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def expected_shapes(model: StripedHyena) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- save


def _config_yaml(model: StripedHyena, config: Any | None) -> str:
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
    trained: Collection[str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write model.safetensors, config.yaml and meta.json into an existing `directory` (each file atomically).

    `config`: the full job config (a root dataclass or a mapping) whose `model:` section is replaced by the
    model's own config; other sections are kept as given. `meta`: extra fields for meta.json. `trained` and
    `base` (from `base_reference`) go together: only the tensors named in `trained` are written, and the
    reference to the base that holds the others goes into meta.json. Returns the sha256 of each file
    written before meta.json.
    """
    from safetensors.torch import save_file

    if (trained is None) != (base is None):
        raise ValueError("write_model_files: pass both `trained` and `base`, or neither")
    directory = Path(directory)
    state = model.state_dict()
    if trained is not None:
        state = {k: v for k, v in state.items() if k in trained}
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    # save_file streams the tensors into the file; `save` would build the whole file as bytes first (twice
    # the weights in RAM: 9 GiB for evo2-1b in fp32).
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    files = {WEIGHTS_FILE: sha256_file(directory / WEIGHTS_FILE)}  # save_file takes only a path: read back
    files[CONFIG_FILE] = atomic_write_text(directory / CONFIG_FILE, _config_yaml(model, config))
    record = {
        "format": FORMAT_NAME,
        "version": 1,
        "parameters": model.num_parameters(),
        "hcl_form": model.config.hcl_form,
        **dict(meta or {}),
        **({BASE: dict(base)} if base is not None else {}),
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
    files = read_meta(directory).get("files")
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
    module: torch.nn.Module,
    directory: str | Path,
    device: str | torch.device = "cpu",
    holds_base: bool = False,
) -> None:
    """Load the weights of checkpoint `directory` (verified by the caller) into `module`, keys and shapes
    compared first: a checkpoint of another model is named in a few lines, not torch's list of every key.
    A checkpoint of trained tensors only (meta.json `base`) loads just those when `holds_base` (the module
    holds that base already: a resume or a rollback of the finetune that wrote it), else its base too."""
    path = Path(directory) / WEIGHTS_FILE
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    partial = holds_base and read_meta(directory).get(BASE) is not None
    hint = "the checkpoint holds another model than the configured one: resume from one of this model"

    def check(tensors: dict[str, Tensor]) -> None:
        wanted = {k: v for k, v in expected.items() if k in tensors} if partial else expected
        check_tensors(tensors, wanted, str(path), hint=hint, finite=False)

    if partial:
        tensors = read_weights(directory, None, device, check=check)
    else:  # the base was checked with the checkpoint (`check_base`)
        tensors = read_checkpoint_tensors(directory, None, False, device, check=check)
    module.load_state_dict(tensors, strict=not partial)


# ---------------------------------------------------------------- checkpoints of trained tensors only


def folded_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """A LoRA layer's weight with its adapters folded in: W + scaling B A, computed in fp32, in W's dtype."""
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def is_adapter_parameter(name: str) -> bool:  # finetune's LoRALinear: <layer>.lora_A, <layer>.lora_B
    return name.endswith((".lora_A", ".lora_B"))


def fold_lora(tensors: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A state dict with LoRA adapters -> the plain one: each `<layer>.lora_A` / `lora_B` pair folded into
    `<layer>.weight` and dropped (what finetune's `merge_lora` does to a model)."""
    folded = {k: v for k, v in tensors.items() if not is_adapter_parameter(k)}
    for key in tensors:
        if key.endswith(".lora_A"):
            layer = key.removesuffix(".lora_A")
            weight, lora_B = tensors[f"{layer}.weight"], tensors[f"{layer}.lora_B"]
            folded[f"{layer}.weight"] = folded_weight(weight, tensors[key], lora_B, scaling)
    return folded


def read_meta(directory: str | Path) -> dict[str, Any]:
    """DIRECTORY/meta.json as a dict ({} when there is none); CheckpointError when unreadable."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return meta


def base_reference(
    path: str | Path,
    *,
    vortex: bool = False,
    verify: bool = True,
    clamp_poles: float | None = None,
    lora_scaling: float | None = None,
) -> dict[str, Any]:
    """The meta.json `base` of a checkpoint whose other tensors are those of `path`: one of our checkpoint
    directories (its recorded sha256 when `verify`, else computed), or a Vortex `.pt` (`vortex`: hashed
    here, read back with the checkpoint's own model config and `clamp_poles`). `lora_scaling`: the base
    holds LoRA adapters, folded into its weights (alpha / rank) when it is read back."""
    path = Path(path)
    if vortex:
        sha256 = {path.name: sha256_file(path)}
    else:
        recorded = recorded_hashes(path, verify) or {}
        sha256 = {
            name: recorded.get(name) or sha256_file(path / name) for name in (WEIGHTS_FILE, CONFIG_FILE)
        }
    reference: dict[str, Any] = {
        "kind": "vortex" if vortex else "checkpoint",
        "path": str(path),
        "absolute": str(path.resolve()),
        "sha256": sha256,
    }
    if clamp_poles is not None:
        reference["clamp_poles"] = clamp_poles
    if lora_scaling is not None:
        reference["lora_scaling"] = lora_scaling
    return reference


def check_base(directory: str | Path, verify: bool = True) -> tuple[dict[str, Any], Path] | None:
    """For a checkpoint of trained tensors only: its meta.json `base` (keys checked) and where that base is
    now (its absolute path, else its path as given), checked against the recorded sha256 unless `verify` is
    False; None for a checkpoint that holds all its tensors."""
    directory = Path(directory)
    meta, base = directory / META_FILE, read_meta(directory).get(BASE)
    if base is None:
        return None
    number = (int, float, type(None))
    valid = {
        "kind": lambda v: v in ("checkpoint", "vortex"),
        "path": lambda v: isinstance(v, str),
        "absolute": lambda v: isinstance(v, (str, type(None))),
        "sha256": lambda v: isinstance(v, dict) and v and all(isinstance(h, str) for h in v.values()),
        "clamp_poles": lambda v: isinstance(v, number),
        "lora_scaling": lambda v: isinstance(v, number),
    }
    bad = (
        [f"{BASE}.{k}" for k, ok in valid.items() if not ok(base.get(k))]
        if isinstance(base, dict)
        else [BASE]
    )
    if bad:
        raise CheckpointError(f"{meta}: key '{bad[0]}' is missing or malformed; restore it from a copy")
    located = next((Path(p) for p in (base.get("absolute"), base["path"]) if p and Path(p).exists()), None)
    if located is None:
        raise CheckpointError(
            f"{directory}: holds only the trained tensors, and its base {base['path']} is gone (not at "
            f'{base.get("absolute")}); put the base back there, or write its new location as "absolute" '
            f'under "{BASE}" in {meta} (its sha256 is still checked)'
        )
    for name, expected in base["sha256"].items() if verify else ():
        path = located if base["kind"] == "vortex" else located / name
        try:
            found = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(
                f"{path}: cannot read the base of {directory}: {exc.strerror or exc}"
            ) from None
        if found != expected:
            raise CheckpointError(
                f"{path}: the base of {directory} changed since that checkpoint was written (its sha256 is "
                f"{found}, {meta} records {expected}); the checkpoint holds only the trained "
                f"tensors, which need that exact base: restore it; {NO_VERIFY_HINT}"
            )
    return base, located


def read_checkpoint_tensors(
    directory: str | Path,
    hashes: Mapping[str, str] | None,
    verify: bool = True,
    device: str | torch.device = "cpu",
    check: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """Every tensor of checkpoint `directory`: `read_weights`, and for a checkpoint of trained tensors only,
    its base's tensors beneath them (the base checked against the recorded sha256 unless `verify` is
    False; a base that is such a checkpoint itself is rebuilt the same way). `check` sees the whole set."""
    found = check_base(directory, verify)
    if found is None:
        return read_weights(directory, hashes, device, check=check)
    (base, located), trained = found, read_weights(directory, hashes, device)
    if base["kind"] == "vortex":
        from evo2_cli.model.vortex import load_vortex

        config = load_model_config(Path(directory) / CONFIG_FILE)
        tensors = load_vortex(config, located, clamp_poles=base.get("clamp_poles")).state_dict()
    else:
        tensors = read_checkpoint_tensors(located, None, verify, device)
    if base.get("lora_scaling") is not None:
        tensors = fold_lora(tensors, base["lora_scaling"])
    tensors = {k: v.to(device) for k, v in tensors.items()} | trained
    if check is not None:
        check(tensors)
    return tensors


# ---------------------------------------------------------------- which checkpoint a path means


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a training run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / META_FILE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step directory `checkpoints/latest` points to (under run_dir as given), else the newest complete
    one; None before the first checkpoint."""
    link = Path(run_dir) / CHECKPOINTS / LATEST
    if link.is_dir() and (link / META_FILE).is_file():
        return link.parent / os.readlink(link)
    complete = step_dirs(run_dir)
    return complete[-1] if complete else None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The step directory `checkpoints/best` points to (under run_dir as given), or None before any eval."""
    link = Path(run_dir) / CHECKPOINTS / BEST
    return link.parent / os.readlink(link) if link.is_symlink() else None


def resolve_checkpoint(path: str | Path, vortex: bool = True) -> Path:
    """What `path` means (first match wins): a Vortex `.pt` (returned as given; refused unless `vortex`), or
    one of our checkpoint directories given as itself, as its model.safetensors, as a directory with a
    `latest` pointer (a symlink, or a file naming a directory) or as a training run directory (its latest
    complete checkpoint). CheckpointError when nothing loadable is there."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        return path.parent
    if not path.exists():
        raise CheckpointError(
            f"{path}: model not found (expected a checkpoint directory, a run directory or a .pt)"
        )
    if vortex and path.is_file() and path.suffix != ".safetensors":
        return path
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    if not (path / WEIGHTS_FILE).exists() and not os.path.lexists(path / LATEST):
        if not (path / CHECKPOINTS).is_dir():
            raise CheckpointError(
                f"{path}: not a checkpoint directory ({WEIGHTS_FILE} is missing), a run directory "
                f"({CHECKPOINTS}/) or a Vortex .pt file"
            )
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: a training run directory without any complete checkpoint yet")
        path = found
    path = _follow_latest(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a checkpoint directory, {name} is missing")
    return path


def _follow_latest(directory: Path, seen: frozenset[str] = frozenset()) -> Path:
    """`directory`, or the directory its `latest` pointer names when it holds no weights (no loops)."""
    latest = directory / LATEST
    if (directory / WEIGHTS_FILE).exists() or not os.path.lexists(latest):
        return directory
    if latest.is_symlink():
        target = Path(os.path.realpath(latest))
    else:
        try:
            target = directory / latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{latest}: not a readable pointer (a symlink, or a file naming a checkpoint directory): "
                f"{exc}"
            ) from None
    seen = seen | {os.path.realpath(directory)}
    if os.path.realpath(target) in seen or not target.is_dir():
        problem = "loops back to a directory it came from" if target.is_dir() else "names no directory"
        raise CheckpointError(f"{latest}: the pointer {problem} ({target}); point it at a checkpoint")
    return _follow_latest(target, seen)


def vortex_config_of(weights: Path, given: str | Path | None, ask: str = "pass --vortex-config FILE") -> Path:
    """The model config YAML of a Vortex .pt: `given`, else the .yml / .yaml of the same name beside it."""
    found = given or next((p for p in map(weights.with_suffix, (".yml", ".yaml")) if p.is_file()), None)
    if found is None:
        raise CheckpointError(
            f"{weights}: a Vortex .pt needs its release config YAML; {ask} or put it beside the weights as "
            f"{weights.with_suffix('.yml').name}"
        )
    return Path(found)


# ---------------------------------------------------------------- load


def load_checkpoint_config(
    path: str | Path, verify: bool = True, vortex_config: str | Path | None = None
) -> ModelConfig:
    """The ModelConfig of any source `resolve_checkpoint` accepts, read without the weights: our config.yaml's
    `model:` section (verified against meta.json unless `verify` is False), or a Vortex .pt's config
    (`vortex_config_of`)."""
    source = resolve_checkpoint(path)
    if source.is_file():
        return load_model_config(vortex_config_of(source, vortex_config))
    check_file(source / CONFIG_FILE, recorded_hashes(source, verify))
    return load_model_config(source / CONFIG_FILE)


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    model: StripedHyena | None = None,
) -> StripedHyena:
    """Rebuild the model of a checkpoint directory from its own files (sha256 as in meta.json unless
    `verify` is False, strict keys, shapes, finite values) into `model`, a meta-device model of its config
    (default `meta_model`; finetune's has adapters or a task head)."""
    return _load_directory(resolve_checkpoint(path, vortex=False), map_location, dtype, verify, model)


def _load_directory(directory: Path, map_location, dtype, verify: bool, model: StripedHyena | None):
    hashes = recorded_hashes(directory, verify)
    check_file(directory / CONFIG_FILE, hashes)  # the config is verified before it is read
    model = model if model is not None else meta_model(load_model_config(directory / CONFIG_FILE))
    expected, source = expected_shapes(model), str(directory / WEIGHTS_FILE)
    hint = f"the weights do not match the model section of {directory / CONFIG_FILE}"
    tensors = read_checkpoint_tensors(
        directory, hashes, verify, map_location, check=lambda t: check_tensors(t, expected, source, hint=hint)
    )
    return build_model(model, tensors, dtype)


def load_source(
    path: str | Path,
    vortex_config: str | Path | None = None,
    *,
    hcl_form: str | None = None,
    clamp_poles: float | None = None,
    verify: bool = True,
) -> StripedHyena:
    """The model at any source `resolve_checkpoint` accepts, as stored (CPU). `vortex_config`: see
    `vortex_config_of`, refused for our checkpoints (they carry their config); `hcl_form` / `clamp_poles`
    apply to Vortex imports (`evo2_cli.model.vortex.load_vortex`); `verify`: see `load_model`."""
    source = resolve_checkpoint(path)
    if source.is_file():
        from evo2_cli.model.vortex import load_vortex

        config = vortex_config_of(source, vortex_config)
        return load_vortex(config, source, hcl_form=hcl_form, clamp_poles=clamp_poles)
    if vortex_config is not None:
        raise CheckpointError(
            f"{source}: --vortex-config is only for Vortex .pt files; our checkpoints carry their config"
        )
    if clamp_poles is not None:  # a checkpoint of ours loads as saved; it would be silently ignored
        raise CheckpointError(f"{source}: --clamp-poles is only for Vortex .pt files; drop it")
    return _load_directory(source, "cpu", None, verify, None)
