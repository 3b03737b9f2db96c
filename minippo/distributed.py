"""Data parallelism on `torch.distributed`: one process per device, each with its own k-bit model copy,
launched by ``torchrun`` (or ``accelerate launch``). Every helper is a no-op with one process.
The group is joined from torchrun's environment with backend nccl on CUDA, gloo on CPU
(``MINIPPO_DIST_BACKEND`` overrides) and a timeout (``MINIPPO_DIST_TIMEOUT`` s, default 1800)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .core import masked_mean, masked_var

T = TypeVar("T")


def init_from_env() -> bool:
    """Join the process group that the launcher describes when WORLD_SIZE > 1; True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = os.environ.get("MINIPPO_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo"
    )
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("MINIPPO_DIST_TIMEOUT", "1800")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def shutdown() -> None:
    """Leave the process group, at the end of a torchrun script: a process that exits while still in
    it can abort in gloo's teardown ("terminate called without an active exception"). Call it when
    the run succeeded: a rank that fails should exit inside the group, so that the launcher reports it
    as the failure's cause. A no-op with one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:  # wait for every rank (e.g. while rank 0 writes files)
    if world_size() > 1:
        dist.barrier()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``x`` over all ranks: op "sum", "mean" or "max"; ``x`` itself is left alone."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return y / world_size() if op == "mean" else y


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world_size * n, ...), rank 0's rows first (equal n on every rank)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of ``x`` over the masked positions of all ranks (two passes, as
    `core.masked_var`); pass them to `core.masked_whiten` to whiten with global statistics."""
    if world_size() == 1:
        return masked_mean(x, mask), masked_var(x, mask)
    mask = mask.to(x.dtype)
    total, count = all_reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / count
    squares = all_reduce(((x - mean) ** 2 * mask).sum())
    return mean, squares / (count - 1).clamp(min=1)


def all_reduce_grads(params: list[torch.Tensor], op: str = "mean") -> None:
    """Sum or average the gradients of ``params`` over ranks in one flat all-reduce (None counts as 0)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), op)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` to every rank (identical adapters to start from)."""
    for p in params if world_size() > 1 else []:
        dist.broadcast(p.data, src=0)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: ``[obj]`` with one process."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def on_rank0(write: Callable[[], T]) -> T | None:
    """Run ``write()`` on rank 0 while the other ranks wait (e.g. writing a file); returns its result on
    rank 0, None elsewhere. An error on rank 0 is raised there and, as a RuntimeError naming it, on every
    other rank: none is left waiting."""
    if world_size() == 1:
        return write()
    result = None
    error = None
    if rank() == 0:
        try:
            result = write()
        except BaseException as err:  # Ctrl-C too: the others must not wait for ever
            error = err
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank 0 failed while the others waited: {message[0]}")
    return result
