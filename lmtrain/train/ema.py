"""An exponential moving average (EMA) of a model's trained weights (Polyak averaging), for validation and
for the weights a checkpoint is used with.

After optimizer step n (1-based), every trained parameter p updates its average a:
    a <- d_n * a + (1 - d_n) * p,    d_n = min(decay, (1 + n) / (10 + n))
The warmup of d_n (as TensorFlow's ExponentialMovingAverage with `num_updates`) keeps the random
initialisation from lingering in the average of a short run. The average starts as the initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def decay_at(decay: float, step: int) -> float:
    """d_n of optimizer step `step` (1-based)."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """The average of `model`'s trainable parameters (a tied weight once, under its first name)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based)."""
        d = decay_at(self.decay, step)
        torch._foreach_mul_(self.average, d)
        torch._foreach_add_(self.average, [p.detach() for p in self.params], alpha=1.0 - d)

    @torch.no_grad()
    def _swap(self) -> None:
        for param, average in zip(self.params, self.average, strict=True):
            kept = param.detach().clone()
            param.copy_(average)
            average.copy_(kept)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: average.detach() for name, average in zip(self.names, self.average, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"the weight average has no '{missing[0]}'")
        for name, average in zip(self.names, self.average, strict=True):
            average.copy_(state[name])
