"""Where a process runs, and with whom: device, torchrun ranks, the process group, DDP/FSDP wrapping.

Scale-out is PyTorch's own: torchrun starts the processes, torch.distributed connects them (nccl on CUDA,
gloo on CPU), DistributedDataParallel or FSDP (`fully_shard`) shard the work.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmtrain.core.dtypes import autocast_dtype
from lmtrain.core.errors import UserError


@dataclass
class Placement:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str, key: str = "trainer.device", local_rank: int = 0) -> torch.device:
    """auto: CUDA when present (this process's GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but this machine has no CUDA device; use {key}=cpu or auto")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_process_group(device_name: str = "auto", timeout_s: float = 600.0, join_timeout_s: float = 60.0) -> None:
    """Join torchrun's process group (once per process).

    Joining and the first barrier give up after `join_timeout_s` (a peer that never starts or hangs before
    training: UserError); every later collective after `timeout_s`, which is longer because it also covers
    a peer building the token cache or writing a checkpoint.
    """
    if dist.is_initialized() or torchrun_world_size() == 1:
        return
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:  # NCCL's first barrier runs on this process's GPU, the one resolve_device picks later too
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=join_timeout_s))
        dist.barrier()
    except RuntimeError as err:  # DistStoreError / DistBackendError: a peer never arrived
        raise UserError(
            f"the other processes did not join within trainer.dist_join_timeout_s={join_timeout_s:g} s "
            f"(a rank failed to start or hangs): {str(err).splitlines()[0]}"
        ) from err
    # torch's documented way to change a live group's timeout (there is no public setter)
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s))


def place(strategy: str, device_name: str, timeout_s: float = 600.0, join_timeout_s: float = 60.0) -> Placement:
    """This process's rank, world and device for trainer.strategy (auto: ddp under torchrun, else single)."""
    world = torchrun_world_size()
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single" and world > 1:
        raise UserError(f"trainer.strategy=single, but torchrun started {world} processes; use ddp or fsdp")
    if world == 1:  # ddp/fsdp over one process is plain single-process training
        return Placement(device=resolve_device(device_name), strategy="single")
    init_process_group(device_name, timeout_s, join_timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Placement(dist.get_rank(), world, local_rank, resolve_device(device_name, local_rank=local_rank), strategy)


def wrap(model: nn.Module, placement: Placement, precision: str) -> nn.Module:
    """The module to run forward/backward through: the model itself, DDP around it, or FSDP-sharded in place."""
    if placement.strategy == "ddp":
        ids = [placement.device.index] if placement.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if placement.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = autocast_dtype(precision)
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on the micro-batches before the last of an optimizer step."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif (set_sync := getattr(module, "set_requires_gradient_sync", None)) is not None:  # FSDP2
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def all_reduce_sum(value: int | float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's value, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (say, to build a cache), then the others (which then reuse it)."""
    if not dist.is_initialized():
        yield
        return
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()


def is_main_process() -> bool:
    """Whether this is the main process of the process group (or there is none)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def torchrun_rank() -> int:
    return int(os.environ.get("RANK", "0"))
