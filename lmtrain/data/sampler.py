"""What a training run asks of its data sampler: the state a checkpoint keeps so a resumed run draws the
same batches as one that never stopped (tokens.WindowSampler, mixture.MixtureSampler, streaming.StreamSampler)."""

from __future__ import annotations

from typing import Protocol

import torch


class Sampler(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
