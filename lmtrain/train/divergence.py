"""The divergence watch: the first step with a non-finite loss or gradient norm ends the run."""

from __future__ import annotations

import torch

from lmtrain.core.errors import Diverged


class Divergence:
    """The first step with a non-finite loss or grad norm, kept on the device (no sync per step) and read only
    where the loop syncs anyway: at the log interval, before validating and before checkpointing."""

    def __init__(self, never: int, device: torch.device, world: int, enabled: bool):
        self.never, self.world, self.enabled = never, world, enabled
        self.first = torch.full((), never, dtype=torch.int64, device=device)

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        nonfinite = ~torch.isfinite(loss)
        if grad_norm is not None:
            nonfinite |= ~torch.isfinite(grad_norm)
        self.first = torch.minimum(self.first, torch.where(nonfinite, step, self.never))

    def check(self) -> None:
        """Raise Diverged naming the first non-finite step (trainer.on_nonfinite=stop)."""
        if not self.enabled:
            return
        if self.world > 1:
            torch.distributed.all_reduce(self.first, op=torch.distributed.ReduceOp.MIN)
        step = int(self.first.item())
        if step != self.never:
            raise Diverged(f"training diverged: non-finite loss or gradient norm at step {step}")
