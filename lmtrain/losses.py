"""Training losses. Each returns (sum over target tokens, number of target tokens) so that the caller
divides once per optimizer step by the total count: that makes gradient accumulation exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V], targets [...] -> (summed loss, count of targets != ignore_index).

    z_loss adds z_loss * log(Z)^2 per target token (PaLM), which keeps the softmax normalizer near 1.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(
        flat_logits, flat_targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    valid = flat_targets != ignore_index
    if z_loss > 0:
        log_z = torch.logsumexp(flat_logits.float(), dim=-1)
        loss = loss + z_loss * (log_z.square() * valid).sum()
    return loss, valid.sum()
