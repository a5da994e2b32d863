"""Optimizers with decay / no-decay parameter groups (Muon for the blocks' matrices, AdamW for the rest), and
warmup + decay learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmtrain.train.muon import Muon, ns_dtype


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


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What Muon trains: the trainable 2-D weights inside the Transformer blocks (attention q/k/v and output
    projections, FFN matrices; a LoRA run's adapter matrices). Embeddings, the LM and classification heads,
    norms and biases are left to AdamW, as in Jordan et al. (2024)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.ndim == 2]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (lmtrain.train.muon: momentum, then the update orthogonalised by a Newton-Schulz iteration; Jordan
    et al. 2024, "Muon: An optimizer for hidden layers in neural networks") for the blocks' matrices, AdamW
    for every other parameter, behind one Optimizer.

    Its param groups are AdamW's (decay, no decay) followed by Muon's (one), the very dicts the two optimizers
    step, and both keep their state in this optimizer's `state`; so `state_dict()` has the single-optimizer
    format (parameters numbered over the groups in that order), a LambdaLR scales every group's lr, and the
    grad scaler and FSDP's state-dict helpers see one optimizer."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon):
        self.adamw, self.muon = adamw, muon
        self.num_adamw_groups = len(adamw.param_groups)
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (after __init__ and load_state_dict)."""
        self.adamw.param_groups = self.param_groups[: self.num_adamw_groups]
        self.muon.param_groups = self.param_groups[self.num_adamw_groups :]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with new objects
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss


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
    muon_lr: float = 0.02,
    muon_adjust_lr_fn: str = "original",
    muon_dtype: str = "auto",
) -> torch.optim.Optimizer:
    """name=muon: `momentum`, `muon_lr`, `muon_adjust_lr_fn` (torch's: `original` scales the lr by
    sqrt(max(1, rows / cols)); `match_rms_adamw` by 0.2 * sqrt(max(rows, cols)), so AdamW's lr and decay
    carry over) and `muon_dtype` (auto | fp32 | bf16: see muon.ns_dtype) drive Muon; `lr`, `betas` and `eps`
    drive AdamW; `weight_decay` applies to both."""
    if name == "muon":
        matrices = {id(p) for p in muon_parameters(model)}
        groups = [
            {**group, "params": [p for p in group["params"] if id(p) not in matrices]}
            for group in parameter_groups(model, weight_decay)
        ]
        fused = {"fused": True} if device.type == "cuda" else {}
        adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fused)
        muon = Muon(
            [{"params": muon_parameters(model)}],  # one group, even when empty (all blocks frozen)
            lr=muon_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adjust_lr_fn=muon_adjust_lr_fn,
            dtype=ns_dtype(device, muon_dtype),
        )
        return MuonWithAdamW(adamw, muon)
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
    """A LambdaLR whose factor is lr_at(step) / lr, applied to every param group (Muon's group too, from its
    own peak lr); its state is a step counter, saved with checkpoints."""
    peak = schedule["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **schedule) / peak)


def resume_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Load a saved schedule and set every group's LR to the next step's under this run's schedule (the same
    as saved unless max_steps or the schedule changed)."""
    scheduler.load_state_dict(state)
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes each group's LR at last_epoch + 1 from the schedule, as a training step would
