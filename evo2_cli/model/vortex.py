"""Evo 2 / Vortex checkpoints: load a released `.pt` into our model, and export ours to that layout.

The Vortex layout (DESIGN.md section 5) differs from our state dict in four places only:

- attention modules are `inner_mha_cls` (ours: `attn`), and each carries a `rotary_emb.inv_freq` buffer;
- `Wqkv.weight` rows are ordered (head, {q, k, v}, head_dim) in the file, ({q, k, v}, head, head_dim) at
  runtime (Vortex permutes at load time; we store the runtime order);
- hcl stores `log_poles` (lambda) [D, S, 1]; our modal form stores p, gamma [D, S] with
  lambda = -exp(p) * exp(gamma). Import maps lambda < 0 to p ~ log(-lambda) and gamma = 0, or a gamma of
  ~1e-7 where exp alone cannot reproduce lambda bit for bit (`modal_from_poles`); lambda >= 0 has no modal
  form and is refused, or clamped with a warning when `clamp_poles` is given. Export writes
  lambda = -exp(p) * exp(gamma), so import -> export reproduces the file exactly.
- files may hold FP8 `*._extra_state` entries (ignored) and are mostly bf16 (log_poles and residues fp32);
  we compute in fp32.

Files are read with `torch.load(weights_only=True)`: a `.pt` carrying pickled Python objects is refused.
"""

from __future__ import annotations

import dataclasses
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml
from torch import Tensor

from evo2_cli.fsio import atomic_path, atomic_write_text, file_kind
from evo2_cli.model.checkpoint import (
    CheckpointError,
    build_model,
    check_tensors,
    expected_shapes,
    load_tensor_file,
    meta_model,
)
from evo2_cli.model.config import ModelConfig, load_model_config
from evo2_cli.model.model import AttentionBlock, LongFilter, StripedHyena, modal_poles

_FP32_KEYS = ("filter.log_poles", "filter.residues")  # kept in fp32 in the released bf16 files


# ---------------------------------------------------------------- reading


def read_vortex_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a Vortex-layout `.pt` (weights_only; `_extra_state` entries dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        # torch's own message for such a file is advice about mmap and torch.save options
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint: not a torch.save zip archive (or a truncated one)"
        )
    data = load_tensor_file(path, mmap=True)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    tensors = {}
    for key, value in data.items():
        if str(key).endswith("_extra_state"):
            continue  # FP8 (Transformer Engine) metadata
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor")
        tensors[str(key)] = value
    return tensors


# ---------------------------------------------------------------- layout conversion


def _qkv_checkpoint_to_runtime(w: Tensor, heads: int) -> Tensor:
    d = w.shape[1]
    return w.reshape(heads, 3, d // heads, d).permute(1, 0, 2, 3).reshape(3 * d, d)  # (H,3,hd,D)->(3,H,hd,D)


def _qkv_runtime_to_checkpoint(w: Tensor, heads: int) -> Tensor:
    d = w.shape[1]
    return w.reshape(3, heads, d // heads, d).permute(1, 0, 2, 3).reshape(3 * d, d)  # (3,H,hd,D)->(H,3,hd,D)


def modal_from_poles(lam: Tensor) -> tuple[Tensor, Tensor]:
    """(p, gamma) with `modal_poles(p, gamma) == lam` bit for bit, for lam < 0 (fp32, (D, S) each).

    gamma = 0, p = log(-lam) is exact for most poles, but not for all: for |p| > 1 neighbouring fp32 values
    of p are more than one fp32 ulp apart after exp, so some lambdas are no exp(p) at all. A tiny gamma
    (exp(gamma) = 1 - k 2^-24, steps finer than one ulp of lambda) makes up the rest. Candidates: p within
    two ulps of log(-lam), each with gamma = 0 and the three gammas around the ratio still missing; the
    closest wins, gamma = 0 on ties.
    """
    lam = lam.float()
    p_rounded = torch.log(-lam.double()).float()
    best_p, best_gamma = p_rounded, torch.zeros_like(lam)
    best_err = (modal_poles(best_p, best_gamma) - lam).abs()
    for p in _ulp_neighbours(p_rounded, 2):
        missing = lam.double() / modal_poles(p, torch.zeros_like(p)).double()  # exp(gamma) wanted, ~1
        steps = torch.round((missing - 1) * 2**24)
        gammas = [torch.zeros_like(lam)]
        gammas += [torch.log1p((steps + shift) * 2**-24).float() for shift in (-1, 0, 1)]
        for gamma in gammas:
            err = (modal_poles(p, gamma) - lam).abs()
            better = err < best_err
            best_p = torch.where(better, p, best_p)
            best_gamma = torch.where(better, gamma, best_gamma)
            best_err = torch.where(better, err, best_err)
    return best_p, best_gamma


def _ulp_neighbours(x: Tensor, count: int) -> list[Tensor]:
    """x and its fp32 neighbours up to `count` ulps away on either side."""
    out = [x]
    for direction in (float("inf"), float("-inf")):
        y = x
        for _ in range(count):
            y = torch.nextafter(y, torch.full_like(y, direction))
            out.append(y)
    return out


def _on_cpu(compute: Callable[[torch.device], Tensor], device: torch.device) -> Tensor:
    """`compute(d)` evaluated on the CPU (d = 'cpu', or 'meta' for a meta model) and moved to `device`:
    derived tensors (poles, inv_freq) then have the same bits whatever device the model is on, and import ->
    export reproduces a file exactly (another device's exp or pow may round differently)."""
    if device.type == "meta":
        return compute(device)
    return compute(torch.device("cpu")).to(device)


def _poles_for_export(f: LongFilter) -> Tensor:
    """lambda (D, S) as the Vortex file stores it."""
    if f.form == "vortex":
        return f.log_poles.detach().float()
    p, gamma = f.p.detach(), f.gamma.detach()
    return _on_cpu(lambda d: modal_poles(p.to(d), gamma.to(d)), p.device)


def vortex_state_dict(model: StripedHyena, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Our model's state dict in the Vortex / Evo 2 release layout (`dtype`: cast everything except
    log_poles and residues, e.g. torch.bfloat16 as in the released files)."""
    c = model.config
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        out[key.replace(".attn.", ".inner_mha_cls.")] = value.detach()
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        if isinstance(block, AttentionBlock):
            key = prefix + "inner_mha_cls.Wqkv.weight"
            out[key] = _qkv_runtime_to_checkpoint(out[key], c.num_attention_heads)
            rotary = block.attn.rotary_emb
            out[prefix + "inner_mha_cls.rotary_emb.inv_freq"] = _on_cpu(
                rotary.inv_freq, block.attn.Wqkv.weight.device
            )
        elif isinstance(block.filter, LongFilter):
            for name in ("p", "gamma", "log_poles"):
                out.pop(prefix + f"filter.{name}", None)
            out[prefix + "filter.log_poles"] = _poles_for_export(block.filter).unsqueeze(-1)  # (D, S, 1)
    if dtype is not None:
        out = {
            k: v if (k.endswith(_FP32_KEYS) or k.endswith("inv_freq")) else v.to(dtype)
            for k, v in out.items()
        }
    return {k: v.contiguous() for k, v in out.items()}


def vortex_expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Vortex checkpoint for `config` (from a meta-device model, so it cannot drift)."""
    with torch.device("meta"):
        model = StripedHyena(dataclasses.replace(config, hcl_form="vortex"))
    return {k: tuple(v.shape) for k, v in vortex_state_dict(model).items()}


def state_dict_from_vortex(
    tensors: Mapping[str, Tensor],
    config: ModelConfig,
    source: str = "checkpoint",
    clamp_poles: float | None = None,
) -> dict[str, Tensor]:
    """Validate a Vortex-layout dict against `config` and convert it to our state dict (fp32)."""
    if config.hcm_filter_length < 128 or config.hcs_filter_length >= 128:
        raise CheckpointError(
            f"{source}: Vortex treats filters of 128+ taps as hcm and shorter ones as hcs; this config has "
            f"hcs_filter_length {config.hcs_filter_length} and hcm_filter_length {config.hcm_filter_length}"
        )
    check_tensors(
        tensors,
        vortex_expected_shapes(config),
        source,
        hint="check that the config YAML is the one released with these weights",
    )
    ours: dict[str, Tensor] = {}
    for key, value in tensors.items():
        # a copy even where the file is fp32 already: a view would keep the memory-mapped file resident
        ours[key.replace(".inner_mha_cls.", ".attn.")] = value.to(torch.float32, copy=True)
    for i in range(config.num_layers):
        prefix = f"blocks.{i}."
        kind = config.kind(i)
        if kind == "attn":
            key = prefix + "attn.rotary_emb.inv_freq"
            stored = ours.pop(key)
            head_dim = config.head_dim
            steps = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            expected = 1.0 / (config.rotary_emb_base**steps)
            if not torch.allclose(stored, expected, rtol=1e-2, atol=0):
                raise CheckpointError(
                    f"{source}: key '{prefix}inner_mha_cls.rotary_emb.inv_freq' does not match "
                    f"rotary_emb_base {config.rotary_emb_base:g} of the config "
                    f"(stored {stored[:3].tolist()}..., expected {expected[:3].tolist()}...); "
                    "check rotary_emb_base"
                )
            key = prefix + "attn.Wqkv.weight"
            ours[key] = _qkv_checkpoint_to_runtime(ours[key], config.num_attention_heads)
        elif kind == "hcl":
            vortex_key = prefix + "filter.log_poles"
            lam = ours.pop(prefix + "filter.log_poles")[..., 0]  # (D, S)
            bad = lam >= 0
            if bool(bad.any()):
                count, worst = int(bad.sum()), float(lam.max())
                if clamp_poles is None and config.hcl_form == "modal":
                    raise CheckpointError(
                        f"{source}: key '{vortex_key}' has {count} pole(s) with lambda >= 0 "
                        f"(max {worst:.3g}): a growing mode has no stable modal form; pass clamp_poles "
                        "(CLI: --clamp-poles) to clamp them below zero, or load with hcl_form 'vortex' "
                        "to keep them as they are"
                    )
                if clamp_poles is not None:
                    warnings.warn(
                        f"{vortex_key}: clamped {count} pole(s) with lambda >= 0 (max {worst:.3g}) to "
                        f"{clamp_poles:g}",
                        stacklevel=2,
                    )
                    lam = torch.where(bad, torch.full_like(lam, clamp_poles), lam)
                else:
                    warnings.warn(
                        f"{vortex_key}: {count} pole(s) with lambda >= 0 kept (hcl_form vortex)", stacklevel=2
                    )
            if config.hcl_form == "modal":
                ours[prefix + "filter.p"], ours[prefix + "filter.gamma"] = modal_from_poles(lam)
            else:
                ours[prefix + "filter.log_poles"] = lam
    check_tensors(ours, expected_shapes(meta_model(config)), source, finite=False)  # values checked above
    return ours


# ---------------------------------------------------------------- public API


def load_vortex(
    config_path: str | Path | ModelConfig,
    checkpoint_path: str | Path,
    hcl_form: str | None = None,
    clamp_poles: float | None = None,
    dtype: torch.dtype | None = None,
) -> StripedHyena:
    """Load an Evo 2 / Vortex `.pt` with its config YAML (release schema or ours, or a ModelConfig).

    hcl_form: 'modal' (default: the config's, modal unless it says otherwise) or 'vortex'.
    clamp_poles: a negative value; poles with lambda >= 0 are set to it (with a warning) instead of refused.
    dtype: parameter dtype (default fp32).
    """
    if clamp_poles is not None and not clamp_poles < 0:
        raise CheckpointError(f"clamp_poles must be negative, got {clamp_poles}")
    config = config_path if isinstance(config_path, ModelConfig) else load_model_config(config_path)
    if hcl_form is not None:
        if hcl_form not in ("modal", "vortex"):
            raise CheckpointError(f"hcl_form must be 'modal' or 'vortex', got {hcl_form!r}")
        config = dataclasses.replace(config, hcl_form=hcl_form)
    tensors = read_vortex_checkpoint(checkpoint_path)
    state = state_dict_from_vortex(tensors, config, str(checkpoint_path), clamp_poles)
    return build_model(meta_model(config), state, dtype)


_RELEASE_YAML_HEADER = (
    "# StripedHyena 2 / Evo 2 model config in the release (Vortex) schema, written by evo2-cli.\n"
)
# What `--overwrite` of an export may replace: a torch zip file, and a release YAML with our header.
VORTEX_WEIGHTS = file_kind("a torch .pt file", b"PK\x03\x04")
RELEASE_YAML = file_kind("a release config YAML", _RELEASE_YAML_HEADER.encode())


def release_yaml(config: ModelConfig) -> str:
    header = (
        _RELEASE_YAML_HEADER
        + "# Load with vortex, or with `evo2_cli.model.load_vortex(this_file, weights.pt)`.\n"
    )
    return header + yaml.safe_dump(
        config.to_release_dict(), sort_keys=False, default_flow_style=None, width=110
    )


def export_vortex(
    model: StripedHyena,
    checkpoint_path: str | Path,
    config_path: str | Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `model` as a Vortex-layout `.pt` and a release-style YAML, each atomically."""
    # Streamed to the file, never whole in memory; through a handle, so a full disk raises an OSError.
    with atomic_path(Path(checkpoint_path)) as tmp, open(tmp, "wb") as handle:
        torch.save(vortex_state_dict(model, dtype), handle)
    atomic_write_text(Path(config_path), release_yaml(model.config))
