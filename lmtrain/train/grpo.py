"""The GRPO objective (Shao et al. 2024, "DeepSeekMath"), as TRL's GRPOTrainer computes it: group-relative
advantages and the clipped policy-ratio loss with an optional k3 KL penalty to a reference.

Per completion token t of completion i, with ratio r = exp(logp - old_logp) and advantage A_i:
  loss_t = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + kl_beta * r * (exp(ref - logp) - (ref - logp) - 1)
(the KL estimate is Schulman's k3, weighted by r as TRL does by default: use_bias_correction_kl=True).
normalize=token sums loss_t over every completion token of the optimizer step (all micro-batches, all
processes) and divides by their count: TRL's loss_type="dapo" (DAPO, Yu et al. 2025). normalize=sequence
averages each completion's tokens, then the completions: TRL's loss_type="grpo". The trainer divides the
summed loss by `count` over the whole step, so accumulation and DDP give the gradient of one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmtrain.core.distributed import is_main_process

if TYPE_CHECKING:
    from lmtrain.train.trainer import Trainer

STD_EPSILON = 1e-4  # TRL's: advantages / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """rewards [prompts, group_size] -> advantages of the same shape: each reward minus its group's mean, and
    with `scale` divided by the group's standard deviation (Bessel-corrected) + 1e-4 (GRPO; without it, Dr.
    GRPO, Liu et al. 2025)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPSILON)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> [B, T] fp32 log-probs of each target under softmax(logits /
    temperature): the sampling distribution, as TRL scores completions."""
    logps = (logits.float() / temperature).log_softmax(-1)
    return logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@dataclass
class Settings:
    epsilon_low: float = 0.2  # the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = 0.2
    kl_beta: float = 0.0  # weight of the k3 KL estimate to the reference (0: no reference)
    temperature: float = 1.0  # sampling temperature: log-probs are those of logits / temperature
    sequence_norm: bool = False  # True: TRL loss_type="grpo"; False: "dapo" (token-level over the step)


def per_token_loss(
    logps: torch.Tensor,
    old: torch.Tensor,
    advantages: torch.Tensor,
    ref: torch.Tensor | None,
    s: Settings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logps, old, ref [B, T], advantages [B] -> (loss [B, T], kl [B, T], clipped [B, T] bool) per token."""
    ratio = torch.exp(logps - old)
    clipped_ratio = ratio.clamp(1 - s.epsilon_low, 1 + s.epsilon_high)
    a = advantages.unsqueeze(1)
    loss = -torch.min(ratio * a, clipped_ratio * a)
    kl = torch.zeros_like(loss)
    if s.kl_beta != 0.0 and ref is not None:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        # times the (differentiable) ratio: the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's default
        # use_bias_correction_kl=True); with one update per batch its value is the plain k3 estimate
        loss = loss + s.kl_beta * kl * ratio
    clipped = (ratio * a > clipped_ratio * a).detach()
    return loss, kl.detach(), clipped


class GRPOObjective:
    """task=rl's training objective (lmtrain.train.objective.Objective). A micro-batch is (tokens [B, T],
    {targets [B, T], mask [B, T] bool: completion tokens, advantages [B], and optionally old [B, T]: the
    sampling policy's log-probs (absent: the current ones, detached, as TRL with num_iterations=1), ref [B, T]:
    the reference's}).
    It also keeps the rollouts' window metrics (`add`), so a resumed run logs the same means."""

    def __init__(self, settings: Settings, device: torch.device):
        self.settings, self.device = settings, device
        # metric -> sum and count on this process since the last log record (numbers or device tensors)
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}

    def count(self, batch: tuple[Any, Any]) -> int:
        mask = batch[1]["mask"]
        return int(mask.shape[0]) if self.settings.sequence_norm else int(mask.sum())

    def begin_step(self, batches: list[tuple[Any, Any]], world: int, device: torch.device) -> None:
        """Nothing: `count` holds every total the objective normalises by."""

    def loss(self, trainer: Trainer, batch: tuple[Any, Any]) -> torch.Tensor:
        inputs, t = batch
        t = {k: v.to(self.device) for k, v in t.items()}
        logps = token_logps(trainer.forward(inputs), t["targets"], self.settings.temperature)
        # one update per sampled batch: the sampling policy is the current one, its log-probs these, detached
        old = t["old"] if "old" in t else logps.detach()
        loss, kl, clipped = per_token_loss(logps, old, t["advantages"], t.get("ref"), self.settings)
        mask = t["mask"].float()
        tokens = mask.sum()
        tokens = tokens.detach().double()  # sums stay on the device: no synchronisation per micro-batch
        self.add("kl", (kl * mask).sum().detach().double(), tokens)
        self.add("clip_fraction", (clipped.float() * mask).sum().detach().double(), tokens)
        if self.settings.sequence_norm:
            return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
        return (loss * mask).sum()

    def add(self, name: str, total: Any, count: Any) -> None:
        """Adds `total` over `count` units (numbers or scalar tensors) to the window mean of metric `name`."""
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def _window(self, world: int) -> tuple[list[str], list[list[float]]]:
        """The window's metric names and [sum, count] rows over every process (a collective when world > 1)."""
        names = sorted(self.sums)
        sums = torch.tensor([[float(self.sums[n]), float(self.counts[n])] for n in names], dtype=torch.float64)
        if world > 1 and names:
            sums = sums.to(self.device)
            torch.distributed.all_reduce(sums)
        return names, sums.tolist()

    def window_metrics(self, world: int) -> dict[str, float]:
        names, rows = self._window(world)
        self.sums, self.counts = {}, {}
        return {n: s / max(c, 1e-12) for n, (s, c) in zip(names, rows, strict=True)}

    def gather_window(self, world: int) -> None:
        if world > 1:
            names, rows = self._window(world)
            keep = is_main_process()
            self.sums = {n: s for n, (s, _) in zip(names, rows, strict=True)} if keep else {}
            self.counts = {n: c for n, (_, c) in zip(names, rows, strict=True)} if keep else {}

    def state_dict(self) -> dict:
        return {"sums": _floats(self.sums), "counts": _floats(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        keep = is_main_process()  # the main process holds the saved window
        self.sums = dict(state["sums"]) if keep else {}
        self.counts = dict(state["counts"]) if keep else {}


def _floats(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The sampling RNG of one optimizer step on one process, seeded from (seed, step, rank): a resumed run
    samples the same completions without keeping a generator's state, and processes sample independently."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
