"""The stateful parts a checkpoint keeps, by name, and where each one's state lives in the folder.

A run hands the writer and the reader one mapping of named parts, each with `state_dict()` and
`load_state_dict(state)`. "model" and "optimizer" go through the strategy (lmtrain.checkpoint.strategy: whole
tensors gathered from, or scattered to, however many processes). Parts whose state is tensors go to the file
TENSOR_PARTS names, keys prefixed with the part's name when it shares a file it does not own. Every other part's
state is JSON, kept under its name in trainer_state.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from lmtrain.checkpoint.files import EMA_FILE, RNG_FILE

STRATEGY_PARTS = ("model", "optimizer")
# part -> (file, key prefix); the file's owner has the empty prefix
TENSOR_PARTS = {"ema": (EMA_FILE, ""), "rng": (RNG_FILE, ""), "sampler": (RNG_FILE, "sampler.")}


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


Parts = Mapping[str, Stateful]


def states(parts: Parts) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The state to save of every part but the strategy's: tensors by file name (the rng file always), and the
    JSON parts' states by part name."""
    tensors: dict[str, dict[str, torch.Tensor]] = {RNG_FILE: {}}
    json_states = {}
    for name, part in parts.items():
        if name in TENSOR_PARTS:
            file, prefix = TENSOR_PARTS[name]
            tensors.setdefault(file, {}).update({prefix + k: v for k, v in part.state_dict().items()})
        elif name not in STRATEGY_PARTS:
            json_states[name] = part.state_dict()
    return tensors, json_states


def saved_states(checkpoint: Path, parts: Parts, json_states: dict[str, Any]) -> dict[str, Any]:
    """The saved state of every part but the strategy's, read from `checkpoint` (its tensor files) and
    `json_states` (trainer_state.json's body)."""
    stored: dict[str, dict[str, torch.Tensor]] = {}
    saved = {}
    for name in parts:
        if name in TENSOR_PARTS:
            file = TENSOR_PARTS[name][0]
            if file not in stored:
                stored[file] = load_file(str(checkpoint / file))
            saved[name] = _tensors_of(name, stored[file])
        elif name not in STRATEGY_PARTS:
            saved[name] = json_states[name]
    return saved


def _tensors_of(name: str, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Part `name`'s tensors out of its file's `stored` tensors: its prefixed keys (prefix dropped), or for the
    file's owner the keys no other part's prefix claims."""
    file, prefix = TENSOR_PARTS[name]
    if prefix:
        return {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}
    others = tuple(p for f, p in TENSOR_PARTS.values() if f == file and p)
    return {k: v for k, v in stored.items() if not k.startswith(others)} if others else dict(stored)


class RngState:
    """The torch generators (CPU, and `device`'s when it is a GPU) as a part: saved as torch_cpu, torch_cuda."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        if "torch_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["torch_cuda"], self.device)
