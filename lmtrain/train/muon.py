"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/): SGD momentum, then each update orthogonalised by a quintic
Newton-Schulz iteration, for 2-D weight matrices.

The algorithm, its coefficients and its group keys are those of `torch.optim.Muon`; lmtrain owns the
iteration to choose its dtype. torch always iterates in bfloat16, which is right on a GPU but over 10x slower
than float32 on a CPU without native bf16 instructions (measured at the matrix sizes of a small model);
`ns_dtype` makes it float32 there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmtrain.core.devices import cpu_has_native_bf16

# torch.optim.Muon's defaults, from Jordan's reference implementation
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ns_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype Muon orthogonalises in on `device`: `requested` (fp32 | bf16), or for `auto` bfloat16 on
    accelerators and on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), float32 on other CPUs."""
    if requested != "auto":
        return NS_DTYPES[str(requested)]
    if device.type != "cpu" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def orthogonalize(
    update: Tensor,
    dtype: torch.dtype,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = EPS,
) -> Tensor:
    """≈ U V^T of update = U S V^T (update [rows, cols]; result [rows, cols] in `dtype`): `steps` iterations of
    X <- a X + (b A + c A²) X with A = X X^T, from X = update / ||update||_F, on the wide orientation
    (cols >= rows) so that A is the smaller Gram matrix. The coefficients leave singular values roughly between
    0.5 and 1.5 rather than at exactly 1, which trains as well (Jordan et al. 2024)."""
    a, b, c = coefficients
    wide = update.size(0) <= update.size(1)
    x = update.to(dtype) if wide else update.to(dtype).T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x if wide else x.T


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The lr for a [rows, cols] matrix: `original` (Jordan) scales it by sqrt(max(1, rows / cols));
    `match_rms_adamw` (Liu et al. 2025, "Muon is Scalable for LLM Training") by 0.2 * sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, orthogonalising in `ns_dtype` (see `ns_dtype()`); otherwise the algorithm,
    param-group keys and state ("momentum_buffer") of `torch.optim.Muon`, so its checkpoints load either way.
    In bfloat16 its updates equal torch's bit for bit. Per step and matrix W with gradient G:
    B <- mu B + (1 - mu) G; U <- G + mu (B - G) if nesterov else B; W <- W (1 - lr wd) - lr' NS(U)."""

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str = "original",
        dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": NS_COEFFICIENTS,
            "eps": EPS,
            "ns_steps": NS_STEPS,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon trains 2-D matrices only")
        self.dtype = dtype  # not a group key: a resumed run orthogonalises in the dtype it chooses itself

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = orthogonalize(update, self.dtype, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
