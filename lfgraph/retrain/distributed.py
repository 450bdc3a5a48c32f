"""One process or many: ``torchrun`` + DDP or FSDP2 (``fully_shard``), on the engines torch ships.

Healing never launches processes itself: run the same command under
``torchrun --nproc_per_node N`` and :func:`setup` joins the process group that torchrun
describes in the environment (``nccl`` on CUDA, ``gloo`` on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LfgraphError

#: Parallel strategies; ``auto`` = DDP when launched by torchrun with more than one process.
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class Parallel:
    """Where this process stands: ``kind`` is ``none``, ``ddp`` or ``fsdp``."""

    kind: str
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(strategy: str = "auto") -> Parallel:
    """Join torchrun's process group when there is one; pick this process's device.

    Guarantees: ``kind == "none"`` with rank 0 and world 1 outside torchrun (or
    ``strategy="none"``); otherwise an initialised default process group.
    """
    if strategy not in STRATEGIES:
        raise LfgraphError(f"unknown parallel strategy {strategy!r}: choose one of {list(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if strategy == "none" or (world == 1 and not dist.is_initialized()):
        return Parallel("none", 0, 1, device)
    owns = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    kind = "ddp" if strategy in ("auto", "ddp") else "fsdp"
    return Parallel(kind, dist.get_rank(), dist.get_world_size(), device, owns)


def wrap(model: nn.Module, par: Parallel, shard_blocks: bool = True) -> nn.Module:
    """``model`` wrapped for ``par``: itself, ``DistributedDataParallel``, or sharded with
    FSDP2 (each ``nn.ModuleList`` element, then the root; with ``shard_blocks=False`` only
    the root, which keeps parameters shared across blocks in one shard group).

    Retraining modes and adapters must already be installed: wrapping fixes the parameter set.
    """
    if par.kind == "none":
        return model
    if par.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[par.device.index] if par.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(par.device.type, (par.world,))
    if shard_blocks:
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def inner(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def full_state(model: nn.Module, par: Parallel) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU copy of the model's state dict, on every rank."""
    if par.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().cpu().clone() for k, v in inner(model).state_dict().items()}


def load_full_state(model: nn.Module, par: Parallel, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (from :func:`full_state`) into the wrapped model."""
    if par.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        inner(model).load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel) -> dict[str, Any]:
    if par.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel, state: dict[str, Any]) -> None:
    if par.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def mean_over_ranks(value: float, par: Parallel) -> float:
    """The mean of a float over all processes (for logging one global loss)."""
    if par.kind == "none":
        return value
    t = torch.tensor([value], dtype=torch.float64, device=par.device if par.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t) / par.world


def gather_objects(obj: Any, par: Parallel) -> list[Any]:
    """``obj`` of every rank, in rank order (one element outside torchrun)."""
    if par.kind == "none":
        return [obj]
    out: list[Any] = [None] * par.world
    dist.all_gather_object(out, obj)
    return out


def barrier(par: Parallel) -> None:
    if par.kind != "none":
        dist.barrier()


def teardown(par: Parallel) -> None:
    """Leave the process group if :func:`setup` created it."""
    if par.owns_group and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["STRATEGIES", "Parallel", "barrier", "full_state", "gather_objects", "inner", "load_full_state",
           "load_optimizer_state", "mean_over_ranks", "optimizer_state", "setup", "teardown", "wrap"]
