"""Atomic checkpoints that load without pickle.

Layout of `checkpoints/step_NNNNNNN/`:
  model.safetensors      weights (tied tensors stored once)
  optimizer.safetensors  optimizer tensors; optimizer.json holds its param groups and scalars
  rng.safetensors        torch CPU/CUDA generator states and the data sampler's generator
  model.json             the TransformerConfig, so the model can be rebuilt without the run's config
  config.yaml            the run's resolved config
  tokenizer.json         the tokenizer, so a checkpoint stands alone
  trainer_state.json     step, counters, scheduler; written last: its presence marks a complete checkpoint
  ema.safetensors        trainer.ema_decay runs only: the average of the trained weights (lmtrain.train.ema); loading
                         the checkpoint for use (generate, evaluate, export, init_from) takes these weights
  adapter.json           adapter runs only: the base model (path and content hash) and the LoRA settings;
                         model.safetensors then holds only the trained tensors
`checkpoints/latest` is a symlink to the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmtrain.checkpoint import meta as checkpoint_meta
from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import share, writing

STEP_DIR = re.compile(r"^step_(\d{7,})$")
COMPLETE_MARKER = "trainer_state.json"
ADAPTER_FILE = "adapter.json"  # an adapter run's checkpoint: its base model and the adapter settings
EMA_FILE = "ema.safetensors"  # the weight average of a trainer.ema_decay run
RNG_FILE = "rng.safetensors"  # the generators: torch's and the data sampler's


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
    weights: dict[str, torch.Tensor] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` into a temporary folder, then rename it into place and repoint `latest`.

    `files` maps extra file names to text content (config.yaml, model.json, tokenizer.json). With `name`
    (such as "best") the checkpoint goes to that folder instead, and `latest` is left alone. With `weights`
    (an adapter run's trained tensors) model.safetensors holds those instead of the whole model. `ema`: the
    weight average, written to ema.safetensors.
    """
    with writing(checkpoint_root):
        checkpoint_root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(checkpoint_root)
    final = checkpoint_root / (name or step_dir_name(step))
    with _staging(checkpoint_root, final) as staging:

        def put(file_name: str, write: Callable[[str], object]) -> None:
            with writing(final / file_name):  # a full disk names the file, not the staging folder
                write(str(staging / file_name))

        if weights is None:
            put("model.safetensors", lambda path: save_model(model, path))
        else:
            put("model.safetensors", _tensor_writer(weights))
        if ema is not None:
            put(EMA_FILE, _tensor_writer(ema))
        tensors, optimizer_meta = _split_optimizer_state(optimizer_state)
        put("optimizer.safetensors", lambda path: save_file(tensors, path))
        put("optimizer.json", lambda path: _write_json(Path(path), optimizer_meta))
        put(RNG_FILE, _tensor_writer(rng))
        for file_name, text in files.items():
            put(file_name, _text_writer(text))
        put(COMPLETE_MARKER, lambda path: _write_json(Path(path), trainer_state))
        _publish(staging, final)
    if name is None:
        point_latest(checkpoint_root, final)
    return final


@contextlib.contextmanager
def _staging(checkpoint_root: Path, final: Path) -> Iterator[Path]:
    """A temporary folder in `checkpoint_root` to write `final`'s files into; removed if writing them fails."""
    with writing(final):
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=checkpoint_root))
    try:
        share(staging)  # mkdtemp makes it private
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _text_writer(text: str) -> Callable[[str], object]:
    return lambda path: Path(path).write_text(text)


def _tensor_writer(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
    """A writer of `tensors` to a safetensors file (which needs contiguous tensors)."""
    return lambda path: save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def _publish(staging: Path, final: Path) -> None:
    """Make the staged files durable, then rename the folder into place in one step."""
    for path in staging.iterdir():
        share(path)  # safetensors writes its files private
        with writing(final / path.name), open(path, "rb") as f:
            os.fsync(f.fileno())
    replaced = None
    if final.exists():  # a rerun of the same step: the old copy stays whole until the new one is in
        replaced = final.with_name(f".{final.name}.tmp-replaced")
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def point_latest(checkpoint_root: Path, target: Path) -> None:
    """Repoint `latest` at `target` (a folder in `checkpoint_root`) atomically."""
    link = checkpoint_root / "latest"
    tmp_link = checkpoint_root / f".latest.tmp-{os.getpid()}"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    with writing(link):
        tmp_link.symlink_to(target.name)
        os.replace(tmp_link, link)
    _fsync_dir(checkpoint_root)


def clean_leftovers(checkpoint_root: Path) -> list[Path]:
    """Remove what a killed writer left (staging folders, `.latest.tmp-*` links, half-pruned or half-written
    `step_*` folders without the completion marker); the caller holds the run dir's lock, so no live process
    is writing them. Returns what was removed."""
    removed = []
    for path in sorted(checkpoint_root.iterdir()) if checkpoint_root.is_dir() else []:
        staged = path.name.startswith(".") and ".tmp-" in path.name
        incomplete = STEP_DIR.match(path.name) and path.is_dir() and not (path / COMPLETE_MARKER).is_file()
        if staged or incomplete:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
    older checkpoint) to hidden `.abandoned-step_*` folders, so neither `latest` nor pruning mixes them up. Only
    the latest abandoned continuation is kept: those set aside before are removed (each is a full checkpoint)."""
    moved = []
    newer = [path for path in complete_steps(checkpoint_root) if step_of(path) > step]
    for earlier in checkpoint_root.glob(".abandoned-step_*") if newer else []:
        if earlier.is_dir() and not earlier.is_symlink():
            shutil.rmtree(earlier, ignore_errors=True)
    for path in complete_steps(checkpoint_root):
        if step_of(path) > step:
            target = path.with_name(f".abandoned-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(path, target)
            moved.append(target)
    return moved


def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"'{path}' is not a step_* checkpoint folder")
    return int(match.group(1))


def newest_valid(checkpoint_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose files are whole and agree with each other, and the damaged
    (path, why) newer than it, newest first."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_steps(checkpoint_root)):
        why = checkpoint_meta.problem(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def prune(checkpoint_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints, never the newest valid one. Each goes out of
    sight first (renamed to a staging name), so a kill mid-delete never leaves a half folder that looks complete."""
    if keep_last <= 0:
        return
    doomed = complete_steps(checkpoint_root)[:-keep_last]
    kept_valid, _ = newest_valid(checkpoint_root)
    for path in doomed:
        if path == kept_valid:
            continue
        hidden = path.with_name(f".{path.name}.tmp-pruned")
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def resolve(path: str | Path, key: str = "ckpt") -> Path:
    """A complete checkpoint from the path of a checkpoint, a run dir, its `checkpoints/` or `latest`; an
    export or a Hugging Face model folder (config.json) stands for itself. A `latest` that points outside its
    checkpoints folder is refused."""
    path = Path(path).expanduser()
    root = path.parent if path.name == "latest" else path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / "latest"
    if latest.is_symlink() and latest.resolve().parent != root.resolve():
        raise UserError(
            f"{key}: '{latest}' points outside its checkpoints folder (to '{os.readlink(latest)}'); "
            "pass the checkpoint you mean as a path"
        )
    if any((path / marker).is_file() for marker in (COMPLETE_MARKER, "export.json", "config.json")):
        return path.resolve()
    if (latest / COMPLETE_MARKER).is_file():
        return latest.resolve()
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


def load_weights(model: nn.Module, checkpoint: Path, partial: bool = False) -> None:
    """The checkpoint's weights into `model`: all of them, or with `partial` (an adapter checkpoint) the
    tensors it holds, each of which the model must have (ValueError otherwise)."""
    if not partial:
        load_model(model, str(checkpoint / "model.safetensors"), strict=True)
        return
    _, unexpected = model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    if unexpected:
        raise ValueError(f"weights the model does not have, e.g. {unexpected[0]}")


def load_ema(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weight average saved with the checkpoint (trainer.ema_decay runs)."""
    return load_file(str(checkpoint / EMA_FILE))


def apply_ema(model: nn.Module, checkpoint: Path) -> None:
    """Put the checkpoint's weight average, if it has one, into `model` in place of the trained weights."""
    if not (checkpoint / EMA_FILE).is_file():
        return
    _, unexpected = model.load_state_dict(load_ema(checkpoint), strict=False)
    if unexpected:
        raise ValueError(f"{EMA_FILE} holds weights the model does not have, e.g. {unexpected[0]}")


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer's state_dict() as saved (parameters numbered in param-group order)."""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    meta = json.loads((checkpoint / "optimizer.json").read_text())
    return _join_optimizer_state(tensors, meta)


def load_rng(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / RNG_FILE))


def param_order(optimizer_state: dict) -> list:
    return [p for group in optimizer_state["param_groups"] for p in group["params"]]


def numbered_optimizer_state(full: dict) -> dict:
    """A full optimizer state keyed by parameter names (torch.distributed.checkpoint) -> keyed by number,
    as optimizer.state_dict() gives it: the format checkpoints keep whatever the strategy."""
    number = {name: i for i, name in enumerate(param_order(full))}
    groups = [{**g, "params": [number[p] for p in g["params"]]} for g in full["param_groups"]]
    return {"state": {number[k]: v for k, v in full["state"].items()}, "param_groups": groups}


def named_optimizer_state(numbered: dict, names: list[str]) -> dict:
    groups, start = [], 0
    for group in numbered["param_groups"]:
        groups.append({**group, "params": names[start : start + len(group["params"])]})
        start += len(group["params"])
    return {"state": {names[int(k)]: v for k, v in numbered["state"].items()}, "param_groups": groups}


def full_state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)
