"""`trainer.micro_batch_size=auto` in the loop: a step whose micro-batch runs out of device memory is run again
from the same data in micro-batches half as large and twice as many. lmtrain divides each micro-batch's summed
loss by the target count of the whole step, so the update stays that of the configured global batch: bitwise
that of a run configured with the smaller micro-batch from the start (the same rows, split the same way)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("lmtrain")


def _split(value, parts: int) -> list:
    if isinstance(value, dict):
        pieces = {key: _split(inner, parts) for key, inner in value.items()}
        return [{key: pieces[key][i] for key in value} for i in range(parts)]
    return list(torch.tensor_split(value, parts))


def split_batches(batches: list, parts: int) -> list:
    """Each (inputs, targets) micro-batch as `parts` consecutive pieces along the batch dimension (inputs a tensor
    [B, ...] or a dict of them; targets [B, ...]); parts=1 returns `batches` itself."""
    if parts == 1:
        return batches
    out = []
    for inputs, targets in batches:
        out += [(x, y) for x, y in zip(_split(inputs, parts), _split(targets, parts), strict=True) if len(y)]
    return out


def rows(batch) -> int:
    return len(batch[1])


def run_splitting(
    batches: list, split: int, backward: Callable[[list], torch.Tensor], free: Callable[[], None], enabled: bool
) -> tuple[torch.Tensor, int]:
    """`backward(split_batches(batches, split))`; with `enabled`, a `torch.OutOfMemoryError` frees the step's
    gradients (`free`) and retries with `split` doubled while a micro-batch still has two rows. Returns what
    `backward` returned and the split that ran."""
    while True:
        parts = split_batches(batches, split)
        try:
            return backward(parts), split
        except torch.OutOfMemoryError:
            if not enabled or rows(parts[0]) < 2:
                raise
            free()
            split *= 2
            log.warning(
                "trainer.micro_batch_size=auto: out of memory at micro-batch %d; retrying the step as %d "
                "micro-batches of %d (the global batch is unchanged)",
                rows(parts[0]),
                len(split_batches(batches, split)),
                rows(split_batches(batches, split)[0]),
            )
