"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen linear
layer plus a trained low-rank update, y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T.

Adapters wrap the model's own linear layers by name; the model does not know about them. The wrapped layer
keeps its `weight` and `bias` under the same names, so the base model's state dict keys are unchanged and
the adapter adds only `<layer>.lora_A` [rank, in] and `<layer>.lora_B` [out, rank].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Shorthands for target modules, by the names lmtrain's blocks give their linear layers.
TARGET_GROUPS = {
    "attention": ("qkv", "proj"),
    "mlp": ("up", "gate", "down"),
    "all_linear": ("qkv", "proj", "up", "gate", "down"),
}
LAYER_NAMES = ("qkv", "proj", "up", "gate", "down")


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias plus a rank-`rank` update scaled by alpha / rank. B starts at zero,
    so the wrapped layer computes exactly what the base layer did until it trains (as in the paper)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default initialisation of A
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.disabled = False  # adapters_off: the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + (alpha / rank) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            linear.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model as it was before its LoRA adapters (the base weights alone) inside the block; a preference
    run's reference model without a second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def expand_targets(targets: list[str]) -> list[str]:
    """Layer names from target modules and shorthands (attention, mlp, all_linear); ValueError for others."""
    names: list[str] = []
    for target in targets:
        for name in TARGET_GROUPS.get(target, (target,)):
            if name not in LAYER_NAMES:
                raise ValueError(f"unknown LoRA target {target!r}")
            if name not in names:
                names.append(name)
    return names


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linear layers of its blocks in LoRALinear.
    Returns the wrapped layers' names."""
    model.requires_grad_(False)
    layer_names = expand_targets(targets)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name.startswith("blocks.") or not isinstance(module, nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in layer_names:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its layer's weight (in place): the model no longer has adapters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a LoRA checkpoint stores)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_" in name}
