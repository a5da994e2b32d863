"""Where a process runs: its device (and, with torchrun, its rank)."""

from __future__ import annotations

import torch

from lmtrain.errors import UserError


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but this machine has no CUDA device; use {key}=cpu or auto")
    return torch.device(name)
