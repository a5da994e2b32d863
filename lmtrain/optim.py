"""Optimizers with decay / no-decay parameter groups, and warmup + decay learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of linear layers only; never on norms, biases or embeddings."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    for param in model.parameters():  # a tied head shares the embedding: listed once
        if not param.requires_grad:
            continue
        (keep if id(param) in no_decay or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    momentum: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    # Fused kernels on CUDA; foreach (the default) elsewhere.
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, **fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **fused)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(
    step: int,
    *,
    name: str,
    lr: float,
    warmup_steps: int,
    max_steps: int,
    min_lr: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, then the named decay, floored at min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return lr
    if name == "inverse_sqrt":
        return max(min_lr, lr * math.sqrt(max(warmup_steps, 1) / max(step, 1)))
    if name == "wsd":
        decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr - (lr - min_lr) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if name == "linear":
        return lr - (lr - min_lr) * progress
    if name == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    raise ValueError(f"unknown scheduler {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, **schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is lr_at(step) / lr; its state is a step counter, saved with checkpoints."""
    peak = schedule["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **schedule) / peak)


def resume_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Load a saved schedule and set every group's LR to the next step's under this run's schedule (the same
    as saved unless max_steps or the schedule changed)."""
    scheduler.load_state_dict(state)
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes each group's LR at last_epoch + 1 from the schedule, as a training step would
