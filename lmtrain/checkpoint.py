"""Atomic checkpoints that load without pickle.

Layout of `checkpoints/step_NNNNNNN/`:
  model.safetensors      weights (tied tensors stored once)
  optimizer.safetensors  optimizer tensors; optimizer.json holds its param groups and scalars
  rng.safetensors        torch CPU/CUDA generator states and the data sampler's generator
  model.json             the TransformerConfig, so the model can be rebuilt without the run's config
  config.yaml            the run's resolved config
  tokenizer.json         the tokenizer, so a checkpoint stands alone
  trainer_state.json     step, counters, scheduler; written last: its presence marks a complete checkpoint
`checkpoints/latest` is a symlink to the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmtrain.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{7,})$")
COMPLETE_MARKER = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2))


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    checkpoint_root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer_state: dict,
    rng: dict[str, torch.Tensor],
    trainer_state: dict,
    files: dict[str, str],
    name: str | None = None,
) -> Path:
    """Write checkpoint `step` into a temporary folder, then rename it into place and repoint `latest`.

    `files` maps extra file names to text content (config.yaml, model.json, tokenizer.json). With `name`
    (such as "best") the checkpoint goes to that folder instead, and `latest` is left alone.
    """
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    for stale in checkpoint_root.glob(".*.tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_root / (name or step_dir_name(step))
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=checkpoint_root))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        save_model(model, str(staging / "model.safetensors"))
        tensors, optimizer_meta = _split_optimizer_state(optimizer_state)
        save_file(tensors, str(staging / "optimizer.safetensors"))
        _write_json(staging / "optimizer.json", optimizer_meta)
        save_file({k: v.contiguous() for k, v in rng.items()}, str(staging / "rng.safetensors"))
        for file_name, text in files.items():
            (staging / file_name).write_text(text)
        _write_json(staging / COMPLETE_MARKER, trainer_state)
        for path in staging.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        replaced = None
        if final.exists():  # a rerun of the same step: the old copy stays whole until the new one is in
            replaced = final.with_name(f".{final.name}.tmp-replaced")
            os.rename(final, replaced)
        os.rename(staging, final)
        _fsync_dir(checkpoint_root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if name is not None:
        return final
    link = checkpoint_root / "latest"
    tmp_link = checkpoint_root / f".latest.tmp-{os.getpid()}"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    tmp_link.symlink_to(final.name)
    os.replace(tmp_link, link)
    _fsync_dir(checkpoint_root)
    return final


def complete_steps(checkpoint_root: Path) -> list[Path]:
    """Complete step checkpoints, oldest first. Staging folders and folders without the marker are skipped."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for path in checkpoint_root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def set_aside_after(checkpoint_root: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` (an abandoned continuation, when a run is resumed from an
    older checkpoint) to hidden `.abandoned-step_*` folders, so neither `latest` nor pruning mixes them up."""
    moved = []
    for path in complete_steps(checkpoint_root):
        if int(STEP_DIR.match(path.name).group(1)) > step:
            target = path.with_name(f".abandoned-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(path, target)
            moved.append(target)
    return moved


def prune(checkpoint_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for path in complete_steps(checkpoint_root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve(path: str | Path, key: str = "ckpt") -> Path:
    """A complete checkpoint from the path of a checkpoint, a run dir, its `checkpoints/` or `latest`; an
    export or a Hugging Face model folder (config.json) stands for itself."""
    path = Path(path).expanduser()
    if any((path / marker).is_file() for marker in (COMPLETE_MARKER, "export.json", "config.json")):
        return path.resolve()
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if root.name == "latest":
        root = root.parent
    if (root / "latest" / COMPLETE_MARKER).is_file():
        return (root / "latest").resolve()
    complete = complete_steps(root)  # `latest` missing or dangling: the newest complete one
    if complete:
        return complete[-1]
    raise UserError(f"{key}: no complete checkpoint at '{path}'")


@contextlib.contextmanager
def readable(checkpoint: Path, key: str) -> Iterator[None]:
    """Turn a missing, truncated or foreign checkpoint file into a one-line error naming `key`."""
    try:
        yield
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: '{checkpoint}' is not a readable lmtrain checkpoint ({detail})") from err


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer's state_dict() as saved (parameters numbered in param-group order)."""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    meta = json.loads((checkpoint / "optimizer.json").read_text())
    return _join_optimizer_state(tensors, meta)


def load_rng(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "rng.safetensors"))


def load_json(checkpoint: Path, name: str) -> Any:
    return json.loads((checkpoint / name).read_text())
