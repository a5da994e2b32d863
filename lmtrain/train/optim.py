"""Optimizers with decay / no-decay parameter groups (Muon for the blocks' matrices, AdamW for the rest), one
builder per optimizer.name in OPTIMIZERS."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmtrain.config import OptimizerConfig
from lmtrain.config.choices import OptimizerName
from lmtrain.train.muon import Muon, ns_dtype


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of linear layers only; never on norms, biases or embeddings."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    for param in model.parameters():  # a tied head shares the embedding: listed once
        if not param.requires_grad:
            continue
        (keep if id(param) in no_decay or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What Muon trains: the trainable 2-D weights inside the Transformer blocks (attention q/k/v and output
    projections, FFN matrices; a LoRA run's adapter matrices). Embeddings, the LM and classification heads,
    norms and biases are left to AdamW, as in Jordan et al. (2024)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.ndim == 2]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (lmtrain.train.muon: momentum, then the update orthogonalised by a Newton-Schulz iteration; Jordan
    et al. 2024, "Muon: An optimizer for hidden layers in neural networks") for the blocks' matrices, AdamW
    for every other parameter, behind one Optimizer.

    Its param groups are AdamW's (decay, no decay) followed by Muon's (one), the very dicts the two optimizers
    step, and both keep their state in this optimizer's `state`; so `state_dict()` has the single-optimizer
    format (parameters numbered over the groups in that order), a LambdaLR scales every group's lr, and the
    grad scaler and FSDP's state-dict helpers see one optimizer."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon):
        self.adamw, self.muon = adamw, muon
        self.num_adamw_groups = len(adamw.param_groups)
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (after __init__ and load_state_dict)."""
        self.adamw.param_groups = self.param_groups[: self.num_adamw_groups]
        self.muon.param_groups = self.param_groups[self.num_adamw_groups :]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state with new objects
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss


def _adamw(model: nn.Module, o: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = _fused(device)
    groups = parameter_groups(model, o.weight_decay)
    return torch.optim.AdamW(groups, lr=peak_lr(o), betas=(o.betas[0], o.betas[1]), eps=o.eps, **fused)


def _adam(model: nn.Module, o: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = _fused(device)
    groups = parameter_groups(model, o.weight_decay)
    return torch.optim.Adam(groups, lr=peak_lr(o), betas=(o.betas[0], o.betas[1]), eps=o.eps, **fused)


def _sgd(model: nn.Module, o: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, o.weight_decay)
    return torch.optim.SGD(groups, lr=peak_lr(o), momentum=o.momentum, **_fused(device))


def _muon(model: nn.Module, o: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """`momentum`, `muon_lr` and `muon_adjust_lr_fn` (torch's: `original` scales the lr by sqrt(max(1, rows /
    cols)); `match_rms_adamw` by 0.2 * sqrt(max(rows, cols)), so AdamW's lr and decay carry over) drive Muon;
    `lr`, `betas` and `eps` drive AdamW; `weight_decay` applies to both; the Newton-Schulz iteration runs in
    `muon_dtype` (auto | fp32 | bf16: lmtrain.train.muon.ns_dtype)."""
    matrices = {id(p) for p in muon_parameters(model)}
    groups = [
        {**group, "params": [p for p in group["params"] if id(p) not in matrices]}
        for group in parameter_groups(model, o.weight_decay)
    ]
    adamw = torch.optim.AdamW(groups, lr=peak_lr(o), betas=(o.betas[0], o.betas[1]), eps=o.eps, **_fused(device))
    muon = Muon(
        [{"params": muon_parameters(model)}],  # one group, even when empty (all blocks frozen)
        lr=o.muon_lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        adjust_lr_fn=o.muon_adjust_lr_fn.value,
        dtype=ns_dtype(device, o.muon_dtype),
    )
    return MuonWithAdamW(adamw, muon)


# optimizer.name -> builder of (model, its config, device)
OPTIMIZERS: dict[OptimizerName, Callable[[nn.Module, OptimizerConfig, torch.device], torch.optim.Optimizer]] = {
    OptimizerName.adamw: _adamw,
    OptimizerName.adam: _adam,
    OptimizerName.sgd: _sgd,
    OptimizerName.muon: _muon,
}
# optimizer.name -> fp32 bytes per trainable parameter of (its state, its update's temporary), for plan's memory
# estimate: Adam(W) keeps two moments and its foreach update one parameter-sized temporary; SGD one momentum
# buffer (none without momentum); Muon one buffer for the blocks' matrices, AdamW's two for the rest: at most two
MEMORY_PER_PARAMETER: dict[OptimizerName, Callable[[OptimizerConfig], tuple[int, int]]] = {
    OptimizerName.adamw: lambda o: (8, 4),
    OptimizerName.adam: lambda o: (8, 4),
    OptimizerName.sgd: lambda o: (4 if o.momentum > 0 else 0, 0),
    OptimizerName.muon: lambda o: (8, 4),
}
# optimizers that need each matrix whole on one process (Muon's Newton-Schulz step), so FSDP cannot shard them
WHOLE_MATRICES = {OptimizerName.muon}


def build_optimizer(model: nn.Module, o: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer o.name names, over `model`'s trainable parameters (decay on matrices only); fused kernels
    on CUDA, foreach (torch's default) elsewhere."""
    return OPTIMIZERS[o.name](model, o, device)


def peak_lr(o: OptimizerConfig) -> float:
    """optimizer.lr; finetune fills a null one in (lmtrain.train.finetune_defaults) before it builds the trainer."""
    assert o.lr is not None, "a null optimizer.lr is derived before the optimizer is built"
    return o.lr


def _fused(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {}
