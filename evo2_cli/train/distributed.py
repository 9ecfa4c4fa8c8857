"""Processes: one (CPU or one GPU) or many under `torchrun` (DDP or FSDP2), on evo2_cli/runtime.py's device.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is a single process and no process group
is created. gloo on CPU, NCCL on CUDA. Rank 0 logs and writes; every rank holds the full data index, and the
loop gives rank r the micro-batches r, r + world, ... of each step, so the windows of a step do not depend on
the number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from evo2_cli.errors import Evo2Error, InputError
from evo2_cli.runtime import Runtime, choose_device, precision_dtype

T = TypeVar("T")


def torchrun_value(name: str, default: int) -> int:
    """The integer torchrun set in environment variable `name` (`default` without torchrun); InputError
    naming the variable when it holds something else."""
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} is not an integer; unset it") from None


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) that torchrun gave this process; (0, 1) without torchrun. Readable before
    `start_runtime`, e.g. to estimate one process's share of the memory."""
    return torchrun_value("RANK", 0), torchrun_value("WORLD_SIZE", 1)


def start_runtime(device: str, precision: str) -> Runtime:
    """Pick the device and precision; join the torchrun process group when launched by torchrun."""
    rank, world_size = torchrun_rank()
    chosen = choose_device(device, "train.device")
    if chosen.type == "cuda":
        local_rank = torchrun_value("LOCAL_RANK", 0)
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    if precision == "bf16" and chosen.type == "cpu":
        raise InputError(
            "train.precision=bf16 needs CUDA (bf16 matmuls are slower than fp32 on CPU); use fp32"
        )
    dtype = precision_dtype(precision, "train", chosen, "train.precision")
    return Runtime(chosen, rank, world_size, None if dtype == torch.float32 else dtype)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        gc.collect()  # objects holding the process group (a DDP reducer) go first
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def parallelize(model: nn.Module, runtime: Runtime, parallelism: str) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` per block, then the root) across processes; the model itself when alone.
    FSDP2 shards in place: `model` keeps its class, names and state-dict keys (as DTensors)."""
    if not runtime.distributed:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` (its class, adapters, heads and names) whose parameters and buffers are on the meta
    device, so it costs no memory. Taken before `parallelize`, it is the plain module a gathered FSDP2 state
    dict is loaded into (`load_state_dict(..., assign=True)`) to write a checkpoint."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        is_parameter = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if is_parameter else meta
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last one."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) gathered to a plain tensor; a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run_on_main(runtime: Runtime, action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 only; if it raises there, every rank raises (no rank is left waiting in a
    collective). Rank 0 re-raises the original error, the others a short pointer to it."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = action()
        except Exception as exc:  # re-raised below, after the other ranks know
            error = exc
    if runtime.distributed:
        failed = torch.tensor([float(error is not None)], device=runtime.device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise Evo2Error("rank 0 failed (its message is above); stopping this rank too")
    if error is not None:
        raise error
    return result
