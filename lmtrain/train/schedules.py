"""Learning-rate schedules: a linear warmup, then the decay scheduler.name picks from SCHEDULES."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmtrain.config import SchedulerConfig
from lmtrain.config.choices import SchedulerName


def _progress(step: int, s: SchedulerConfig, max_steps: int) -> float:
    """Share of the decay done at `step`: 0 at the end of warmup, 1 at max_steps."""
    return min(1.0, (step - s.warmup_steps) / max(1, max_steps - s.warmup_steps))


def _cosine(step: int, s: SchedulerConfig, lr: float, max_steps: int) -> float:
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * _progress(step, s, max_steps))) * (lr - s.min_lr)


def _linear(step: int, s: SchedulerConfig, lr: float, max_steps: int) -> float:
    return lr - (lr - s.min_lr) * _progress(step, s, max_steps)


def _constant(step: int, s: SchedulerConfig, lr: float, max_steps: int) -> float:
    return lr


def _inverse_sqrt(step: int, s: SchedulerConfig, lr: float, max_steps: int) -> float:
    return max(s.min_lr, lr * math.sqrt(max(s.warmup_steps, 1) / max(step, 1)))


def _wsd(step: int, s: SchedulerConfig, lr: float, max_steps: int) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): lr held, then linear to min_lr over the last
    decay_fraction of max_steps."""
    decay_start = max(s.warmup_steps, max_steps - round(s.decay_fraction * max_steps))
    if step < decay_start:
        return lr
    return lr - (lr - s.min_lr) * min(1.0, (step - decay_start) / max(1, max_steps - decay_start))


# scheduler.name -> LR after warmup at (step, its config, peak lr, max_steps)
SCHEDULES: dict[SchedulerName, Callable[[int, SchedulerConfig, float, int], float]] = {
    SchedulerName.cosine: _cosine,
    SchedulerName.linear: _linear,
    SchedulerName.constant: _constant,
    SchedulerName.inverse_sqrt: _inverse_sqrt,
    SchedulerName.wsd: _wsd,
}


def lr_at(step: int, s: SchedulerConfig, lr: float, max_steps: int) -> float:
    """LR of optimizer step `step` (0-based) for peak `lr`: linear warmup over s.warmup_steps, then the
    decay s.name names (floored at s.min_lr where it decays)."""
    if step < s.warmup_steps:
        return lr * (step + 1) / (s.warmup_steps + 1)
    return SCHEDULES[s.name](step, s, lr, max_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, s: SchedulerConfig, lr: float, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is lr_at(step) / lr, applied to every param group (Muon's group too, from its
    own peak lr); its state is a step counter, saved with checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, s, lr, max_steps) / lr)


def resume_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Load a saved schedule and set every group's LR to the next step's under this run's schedule (the same
    as saved unless max_steps or the schedule changed)."""
    scheduler.load_state_dict(state)
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes each group's LR at last_epoch + 1 from the schedule, as a training step would


class ResumedSchedule:
    """The schedule as a checkpoint part: its state is the scheduler's; loading it resumes this run's schedule
    (`resume_schedule`)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        resume_schedule(self.scheduler, state)
