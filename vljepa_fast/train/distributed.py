"""The process group, the device, and the data-parallel wrapper (DDP or FSDP2) of a run.

Under torchrun (``WORLD_SIZE`` in the environment) the group comes from its environment;
``--dist ddp|fsdp`` in a plain process makes a one-process group (the same code path, world
size 1). NCCL on CUDA, gloo on CPU.

The learnable temperature (``VLJEPA.logit_scale``, a 0-dim parameter) is kept out of both
wrappers (FSDP2 cannot shard a 0-dim tensor, and DDP would see its gradient arrive outside
its forward in GradCache accumulation): :meth:`Dist.average_grads` all-reduces its gradient
like the wrappers do theirs, so it stays identical on every rank.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "setup", "wrap"]

T = TypeVar("T")


@dataclass
class Dist:
    """Where this process stands: ``kind`` ("none", "ddp", "fsdp"), ``rank``, ``world``,
    ``device`` and ``group`` (None without a process group)."""

    kind: str
    rank: int
    world: int
    device: torch.device
    group: object | None
    owns_group: bool = False
    store_dir: str | None = None  # the one-process group's FileStore folder (removed at close)

    @property
    def main(self) -> bool:
        """Rank 0 (writes metrics, commits checkpoints, shows progress)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``t`` reduced over every rank in place (sum or max); a no-op without a group."""
        if self.group is not None:
            red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            dist.all_reduce(t, op=red, group=self.group)
        return t

    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this rank, where a ValueError on any rank is raised on every rank (the
        failing rank's own message; the others say which rank failed), instead of leaving
        the ranks that did not fail waiting in their next collective. One all-reduce."""
        err: ValueError | None = None
        out = None
        try:
            out = fn()
        except ValueError as e:
            err = e
        if self.group is None:
            if err is not None:
                raise err
            return out
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        first = torch.tensor([self.rank if err is not None else self.world], device=dev)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.group)
        r = int(first)
        if err is not None:
            raise err
        if r < self.world:
            raise ValueError(f"rank {r} of {self.world} stopped with an error (see its message)")
        return out

    def average_grads(self, params: list[nn.Parameter]) -> None:
        """The mean over ranks of each parameter's gradient (those the wrapper ignores)."""
        if self.group is None:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                p.grad.div_(self.world)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device: cuda asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(kind: str, device: str = "auto") -> Dist:
    """Initialise (or join) the process group for ``kind`` and pick this rank's device.

    Raises:
        ValueError: ``--dist none`` under torchrun with more than one process (the ranks
            would train apart), or a process group of another backend already initialised.
    """
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    if kind == "none":
        if world_env > 1:
            raise ValueError(
                f"--dist: none, but torchrun started {world_env} processes: pass --dist ddp or "
                "--dist fsdp (or run one process)"
            )
        return Dist("none", 0, 1, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns, store_dir = False, None
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # a plain process: a one-rank group over a file store
            store_dir = tempfile.mkdtemp(prefix="vljepa_fast_train_")
            store = dist.FileStore(os.path.join(store_dir, "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        owns = True
    elif dist.get_backend() != backend:
        raise ValueError(
            f"--device: the process group uses {dist.get_backend()}, a {dev.type} run needs "
            f"{backend}"
        )
    group = dist.group.WORLD
    return Dist(kind, dist.get_rank(), dist.get_world_size(), dev, group, owns, store_dir)


def wrap(module: nn.Module, d: Dist, blocks: list[nn.Module], ignored: list[nn.Parameter]):
    """``module`` wrapped for data parallelism: DDP, or FSDP2 with every module of ``blocks``
    (the transformer layers) sharded on its own, then the rest at the root. ``ignored``
    parameters are left replicated and unsynchronised (see the module doc)."""
    if d.kind == "none":
        return module
    if d.kind == "ddp":
        names = {id(p): n for n, p in module.named_parameters()}
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, [names[id(p)] for p in ignored]
        )
        ids = None if d.device.type == "cpu" else [d.device.index]
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    keep = set(ignored)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, ignored_params=keep)
    return module


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, d: Dist, sync: bool) -> Iterator[None]:
    """Gradient synchronisation on (the last micro-batch) or off (the ones before it)."""
    if d.kind == "ddp" and not sync:
        with wrapped.no_sync():
            yield
        return
    if d.kind == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    yield
