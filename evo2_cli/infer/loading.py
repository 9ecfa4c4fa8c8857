"""`load_inference_model`: the model package's `load_source` (any checkpoint source) on the device and in
the dtype (evo2_cli/runtime.py's names) every `evo2 infer` subcommand asks for."""

from __future__ import annotations

from pathlib import Path

import torch

from evo2_cli.model.checkpoint import load_source
from evo2_cli.model.model import StripedHyena, is_filter_parameter
from evo2_cli.runtime import choose_device, precision_dtype


def load_inference_model(
    path: str | Path,
    vortex_config: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    hcl_form: str | None = None,
    clamp_poles: float | None = None,
    verify: bool = True,
) -> StripedHyena:
    """The model at `path` (`load_source`: checked, verified unless `verify` is False) on `device` in `dtype`
    (hyena filter parameters stay fp32), in eval mode, gradients off."""
    device = choose_device(device) if isinstance(device, str) else device
    dtype = precision_dtype(dtype, "infer", device) if isinstance(dtype, str) else dtype
    model = load_source(path, vortex_config, hcl_form=hcl_form, clamp_poles=clamp_poles, verify=verify)
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
