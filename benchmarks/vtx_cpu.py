"""Run the official Evo 2 engine (Vortex, PyPI `vtx`) on a CPU in fp32, for the benchmark and optional tests.

vtx is not a dependency of evo2-cli. Get it without installing it:

    pip download vtx==1.1.0 --no-deps -d /tmp/vtx && unzip -q /tmp/vtx/vtx-*.whl -d /tmp/vtx/ex
    pip install --no-deps --target /tmp/vtx/deps einops==0.8.1 tqdm

and pass both directories (`--vtx-path /tmp/vtx/ex --vtx-path /tmp/vtx/deps`, or
EVO2_VTX_PATH=/tmp/vtx/ex:/tmp/vtx/deps for the tests). Its CUDA-only pieces are replaced in this process
only: `flash_attn_2_cuda` and `triton` become empty modules, its Triton rotary kernel
(`vortex.ops.embedding.rotary.apply_rotary`) a torch function with the same semantics, and
`torch.cuda.device` accepts a CPU device as a no-op. With these, vtx reproduces the conformance fixture's
logits to 1.2e-5 (measured; round-off, as between any two correct implementations).

    python benchmarks/vtx_cpu.py '{"paths": [...], "config": C, "weights": W, "ids": IDS, "out": OUT}'

writes OUT (torch.save of {"logits": [B, L, 512] fp32}). benchmarks/model_bench.py imports
`install_cpu_shims` and `load_model` instead, to time vtx and our model alternately in one process.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import tempfile
import types


class _Anything:
    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __getitem__(self, key):
        return _Anything()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    roots = ("flash_attn_2_cuda", "triton", "flash_attn")

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _apply_rotary(
    x,
    cos,
    sin,
    seqlen_offsets=0,
    cu_seqlens=None,
    max_seqlen=None,
    interleaved=False,
    inplace=False,
    conjugate=False,
):
    """flash-attn's apply_rotary in torch: x (B, L, H, hd), cos/sin (L_ro, rot / 2), NeoX half-split."""
    import torch

    assert cu_seqlens is None and not interleaved
    seqlen, rot = x.shape[1], cos.shape[-1] * 2
    if isinstance(seqlen_offsets, torch.Tensor):
        idx = seqlen_offsets[:, None] + torch.arange(seqlen, device=x.device)
        c, s = cos[idx][:, :, None], sin[idx][:, :, None]
    else:
        c = cos[seqlen_offsets : seqlen_offsets + seqlen][None, :, None]
        s = sin[seqlen_offsets : seqlen_offsets + seqlen][None, :, None]
    s = -s if conjugate else s
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 : rot]
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    out = x if inplace else x.clone()
    out[..., : rot // 2], out[..., rot // 2 : rot] = r1, r2
    return out


def install_cpu_shims(paths: list[str]) -> None:
    import torch

    sys.path[:0] = paths
    sys.meta_path.insert(0, _StubFinder())

    class _CudaDevice(torch.cuda.device):
        def __init__(self, device):
            on_cpu = isinstance(device, (str, torch.device)) and torch.device(device).type != "cuda"
            if device is None or on_cpu:
                self.idx, self.prev_idx = -1, -1
            else:
                super().__init__(device)

    torch.cuda.device = _CudaDevice
    shim = types.ModuleType("vortex.ops.embedding.rotary")
    shim.apply_rotary = _apply_rotary
    sys.modules["vortex.ops.embedding.rotary"] = shim


def load_model(config_path: str, weights_path: str):
    """A vtx StripedHyena in fp32 with the given release-schema YAML and Vortex-layout weights."""
    import logging

    import torch
    import yaml

    cwd = os.getcwd()
    os.chdir(tempfile.gettempdir())  # importing vortex creates activations_debug.log in the working dir
    try:
        from vortex.model.model import StripedHyena
        from vortex.model.utils import dotdict
    finally:
        os.chdir(cwd)

    logging.disable(logging.WARNING)
    with open(config_path) as handle:
        config = dotdict(yaml.safe_load(handle))
    for key in ("attn_block_dtype", "hyena_block_dtype", "mlp_dtype", "params_dtype"):
        config[key] = torch.float32
    with contextlib.redirect_stdout(sys.stderr):
        model = StripedHyena(config).float()
        model.custom_load_state_dict(torch.load(weights_path, weights_only=True))
    return model.eval(), config


def main(request: dict) -> None:
    """Write vtx's fp32 logits for the given config, weights and input ids (used by the optional tests)."""
    import torch

    install_cpu_shims(request["paths"])
    model, _ = load_model(request["config"], request["weights"])
    with torch.inference_mode():
        logits, _ = model(torch.load(request["ids"], weights_only=True))
    torch.save({"logits": logits.float()}, request["out"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
