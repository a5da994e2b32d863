"""How the model and optimizer state travel between the processes of a run and a checkpoint, which always holds
whole tensors (so any number of processes can resume it): kept as they are (one process, DDP), or gathered
from and scattered to FSDP shards with torch.distributed.checkpoint's full state dicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.parts import Parts
from lmtrain.core.distributed import Placement
from lmtrain.model.transformer import TransformerLM


@dataclass
class Gathered:
    """What a checkpoint saves of model and optimizer (on the main process; elsewhere nothing). `weights`: an
    adapter run's trained tensors (model.safetensors then holds only those), else None and `model` is saved."""

    model: torch.nn.Module
    weights: dict[str, torch.Tensor] | None
    optimizer_state: dict


class _Adapter:
    """What both strategies share: the placement, and the parts they move (model, optimizer) out of a mapping."""

    def __init__(self, placement: Placement):
        self.placement = placement

    @staticmethod
    def model(parts: Parts) -> TransformerLM:
        return cast(TransformerLM, parts["model"])

    @staticmethod
    def optimizer(parts: Parts) -> torch.optim.Optimizer:
        return cast(torch.optim.Optimizer, parts["optimizer"])


class Local(_Adapter):
    """One process, or DDP (every process holds everything): the state is the modules' own."""

    def gather(self, parts: Parts, trained: set[str] | None) -> Gathered:
        """The model (or with `trained`, an adapter run's trained tensors) and the optimizer state."""
        model = self.model(parts)
        weights = None if trained is None else {k: v for k, v in model.state_dict().items() if k in trained}
        return Gathered(model, weights, self.optimizer(parts).state_dict())

    def scatter(self, source: Path, parts: Parts, optimizer_state: dict, partial: bool) -> None:
        """`source`'s weights (with `partial`, an adapter checkpoint's trained tensors only) and the optimizer
        state into place."""
        checkpoint.load_weights(self.model(parts), source, partial=partial)
        self.optimizer(parts).load_state_dict(optimizer_state)


class Sharded(_Adapter):
    """FSDP: whole tensors gathered on the main process, and each process's shards cut from them on loading."""

    def gather(self, parts: Parts, trained: set[str] | None) -> Gathered:
        """As Local.gather; every process takes part, only the main process gets the state."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model, optimizer = self.model(parts), self.optimizer(parts)
        options = checkpoint.full_state_options()
        full = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.placement.is_main:  # full state dicts are gathered on the main process only
            return Gathered(model, None, {})
        optimizer_state = checkpoint.numbered_optimizer_state(optimizer_state)
        tensors = {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}  # full state: plain tensors
        if trained is not None:
            return Gathered(model, {k: v for k, v in tensors.items() if k in trained}, optimizer_state)
        whole = TransformerLM(model.config)  # saved as a module, so tied weights are stored once
        whole.load_state_dict(tensors)
        return Gathered(whole, None, optimizer_state)

    def scatter(self, source: Path, parts: Parts, optimizer_state: dict, partial: bool) -> None:
        """As Local.scatter; each process keeps its shards."""
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model, optimizer = self.model(parts), self.optimizer(parts)
        weights = load_file(str(source / "model.safetensors"))
        if not partial:  # a tied weight is stored once; the sharded model names it under each of its names
            for tied in model.tied_weights():
                shared = weights[next((name for name in tied if name in weights), tied[0])]
                weights.update(dict.fromkeys(tied, shared))
        set_model_state_dict(model, dict(weights), options=checkpoint.full_state_options(strict=not partial))
        options = checkpoint.full_state_options()
        names = checkpoint.param_order(get_optimizer_state_dict(model, optimizer, options=options))
        named = checkpoint.named_optimizer_state(optimizer_state, names)
        set_optimizer_state_dict(model, optimizer, named, options=options)


Strategy = Local | Sharded


def strategy_for(placement: Placement) -> Strategy:
    """The strategy adapter of `placement` (trainer.strategy: single | ddp | fsdp)."""
    return Sharded(placement) if placement.strategy == "fsdp" else Local(placement)
