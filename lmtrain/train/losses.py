"""Training losses. Each returns (sum over target tokens, number of target tokens) so that the caller
divides once per optimizer step by the total count: that makes gradient accumulation exact."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from lmtrain.config import LossConfig
from lmtrain.config.choices import KL, LossName


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V], targets [...] -> (summed loss, count of targets != ignore_index).

    z_loss adds z_loss * log(Z)^2 per target token (PaLM), which keeps the softmax normalizer near 1.
    class_weights [V] scale each target's loss by its class's weight (the count stays a plain count,
    so a balanced weighting keeps the loss on the scale of the unweighted one).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(
        flat_logits,
        flat_targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
        weight=None if class_weights is None else class_weights.to(flat_logits.device, torch.float32),
    )
    valid = flat_targets != ignore_index
    if z_loss > 0:
        log_z = torch.logsumexp(flat_logits.float(), dim=-1)
        loss = loss + z_loss * (log_z.square() * valid).sum()
    return loss, valid.sum()


def scored(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Evaluation's loss, the one every validation and score uses (trainer, tasks, export): plain cross-entropy
    in fp32 (no smoothing, z-loss or class weights), as (float64 sum over the targets, number of targets).
    logits [..., V], targets [...]."""
    loss, count = cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    return loss.double(), int(count)


def validation_loss(
    batches: Iterable[tuple[Any, torch.Tensor]],
    logits_of: Callable[[tuple[Any, torch.Tensor]], torch.Tensor],
    ignore_index: int = -100,
) -> tuple[torch.Tensor, int]:
    """The validation loss that trainer, tasks and export report, as (float64 sum of `scored` over every
    target, number of targets); the mean is sum / count. `logits_of(batch)`: the model's logits [..., V] for
    a batch (inputs, targets [...]), on the device the sum is kept on."""
    total: torch.Tensor | None = None
    count = 0
    for batch in batches:
        logits = logits_of(batch)
        loss, scored_targets = scored(logits, batch[1].to(logits.device), ignore_index)
        total = loss if total is None else total + loss
        count += scored_targets
    return (total if total is not None else torch.zeros((), dtype=torch.float64)), count


def distillation(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    kl: KL = KL.forward,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha * T^2 * KL + (1 - alpha) * cross-entropy, summed over the positions with a target.

    kl=forward is KL(teacher || student) (the student covers the teacher's mass, Hinton et al.);
    reverse is KL(student || teacher) (mode-seeking). The T^2 factor keeps the soft-target gradients on
    the scale of the hard-label ones as T changes.
    """
    hard, count = cross_entropy(
        logits,
        targets,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_index=ignore_index,
        class_weights=class_weights,
    )
    valid = (targets != ignore_index).reshape(-1)
    student = (logits.reshape(-1, logits.shape[-1])[valid].float() / temperature).log_softmax(-1)
    teacher = (teacher_logits.reshape(-1, teacher_logits.shape[-1])[valid].float() / temperature).log_softmax(-1)
    if kl is KL.forward:
        divergence = (teacher.exp() * (teacher - student)).sum()
    else:
        divergence = (student.exp() * (student - teacher)).sum()
    return alpha * temperature**2 * divergence + (1.0 - alpha) * hard, count


def _common(lo: LossConfig, class_weights: torch.Tensor | None) -> dict:
    return dict(
        label_smoothing=lo.label_smoothing, z_loss=lo.z_loss, ignore_index=lo.ignore_index, class_weights=class_weights
    )


def _cross_entropy(lo: LossConfig, class_weights: torch.Tensor | None) -> Callable:
    return partial(cross_entropy, **_common(lo, class_weights))


def _distill(lo: LossConfig, class_weights: torch.Tensor | None) -> Callable:
    return partial(distillation, temperature=lo.temperature, alpha=lo.alpha, kl=lo.kl, **_common(lo, class_weights))


# loss.name -> builder of the training loss from (its config, class weights [num_classes] or None)
LOSSES: dict[LossName, Callable[[LossConfig, torch.Tensor | None], Callable]] = {
    LossName.cross_entropy: _cross_entropy,
    LossName.distill: _distill,
}
# losses that read a teacher's logits (loss.teacher), passed to them as teacher_logits
TEACHER_LOSSES = {LossName.distill}


def build_loss(lo: LossConfig, class_weights: torch.Tensor | None = None) -> Callable:
    """The training loss lo.name names: (logits, targets[, teacher_logits]) -> (sum, count). Validation
    always uses `scored`."""
    return LOSSES[lo.name](lo, class_weights)
