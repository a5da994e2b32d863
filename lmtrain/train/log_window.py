"""The log window: the steps between two metrics.jsonl records, whose mean loss and tokens/s a record reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class LogWindow:
    """The log window: its summed loss (this process's share, on the device), start time and tokens."""

    loss: torch.Tensor
    start_tokens: int
    started: float = field(default_factory=time.perf_counter)

    def restart(self, tokens_seen: int) -> None:
        self.started, self.start_tokens = time.perf_counter(), tokens_seen

    def pause(self, work: Callable[[], None]) -> None:  # validating, saving: no training time in tokens/s
        started = time.perf_counter()
        work()
        self.started += time.perf_counter() - started

    def total(self, world: int) -> float:
        """The window's loss summed over processes (saved with a checkpoint, so a resumed window continues)."""
        total = self.loss.clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        return total.item()
