"""The one table of precision names: `fp32 | bf16 | fp16` (trainer.precision, export dtype) to torch dtypes,
and the names `transformers` writes in config.json."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in for trainer.precision; None for fp32 (no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]
