"""Every path a command reads or writes, checked before any compute: it exists (or can be made), it is a
file or a folder as the key needs, and it can be read (or written). One line per problem, naming the key."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtrain.config.schema import (
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    PredictConfig,
    PretrainConfig,
)
from lmtrain.core.errors import UserError
from lmtrain.data import corpus

# schema -> the keys it reads as data (file, folder or `datasets` name), checkpoints, text files,
# and writes as a file or a folder
DATA: dict[type, list[str]] = {
    PretrainConfig: ["data.train", "data.validation"],
    FinetuneConfig: ["data.train", "data.validation", "data.test"],
    EvaluateConfig: ["data.train", "data.validation", "data.test"],
    PredictConfig: ["input"],
}
CHECKPOINTS: dict[type, list[str]] = {
    PretrainConfig: ["init_from", "loss.teacher"],
    FinetuneConfig: ["init_from", "loss.teacher"],
    EvaluateConfig: ["ckpt"],
    GenerateConfig: ["ckpt"],
    PredictConfig: ["ckpt"],
    ExportConfig: ["ckpt"],
}
TEXT_FILES: dict[type, list[str]] = {
    GenerateConfig: ["prompt_file"],
    EvaluateConfig: ["suite.path"],
    PretrainConfig: ["trainer.eval_suite"],
    FinetuneConfig: ["trainer.eval_suite"],
}
OUT_FILES: dict[type, list[str]] = {PredictConfig: ["output"]}
OUT_FOLDERS: dict[type, list[str]] = {PretrainConfig: ["data.cache_dir"], ExportConfig: ["out"]}


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_data(key: str, value: str) -> str | None:
    """A data source: a readable file or folder, a `datasets` name, or a folder written by save_to_disk."""
    folder = Path(value).expanduser()
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        return (
            None if os.access(folder, os.R_OK | os.X_OK) else f"{key}: cannot read folder '{value}': permission denied"
        )
    try:
        files = corpus.resolve_files(value, key)
    except UserError as err:
        return str(err)
    if files and value != corpus.EMBEDDED:
        unreadable = next((p for p in files if not os.access(p, os.R_OK)), None)
        if unreadable is not None:
            return f"{key}: cannot read '{unreadable}': permission denied"
    return None


def check_checkpoint(key: str, value: str) -> str | None:
    path = Path(value).expanduser()
    if not path.exists():
        return f"{key}: no such checkpoint or run folder '{value}'"
    if not path.is_dir():
        return f"{key}: '{value}' is a file; pass a checkpoint or run folder"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{key}: cannot read folder '{value}': permission denied"
    return None


def check_text_file(key: str, value: str) -> str | None:
    """A file read whole as UTF-8 text."""
    path = Path(value).expanduser()
    if not path.exists():
        return f"{key}: no such file '{value}'"
    if path.is_dir():
        return f"{key}: '{value}' is a folder; pass a text file"
    try:
        path.read_bytes().decode("utf-8")
    except PermissionError:
        return f"{key}: cannot read '{value}': permission denied"
    except UnicodeDecodeError as err:
        return f"{key}: '{value}' is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})"
    return None


def _writable_ancestor(key: str, value: str, path: Path) -> str | None:
    """The nearest existing ancestor of `path` must be a folder we may create things in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{key}: cannot create '{value}': '{parent}' is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: cannot create '{value}': folder '{parent}' is not writable"
    return None


def check_out_file(key: str, value: str) -> str | None:
    path = Path(value).expanduser()
    if path.is_dir():
        return f"{key}: '{value}' is a folder; pass a file name"
    if path.exists():
        return f"{key}: cannot write '{value}': permission denied" if not os.access(path, os.W_OK) else None
    return _writable_ancestor(key, value, path)


def check_out_folder(key: str, value: str) -> str | None:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        return f"{key}: '{value}' is a file; pass a folder"
    if path.is_dir():
        return None if os.access(path, os.W_OK | os.X_OK) else f"{key}: folder '{value}' is not writable"
    return _writable_ancestor(key, value, path)


def check_paths(cfg: Any) -> None:
    """Raises UserError listing every path of the typed config `cfg` that cannot be used."""
    schema = type(cfg)
    checks: list[tuple[dict[type, list[str]], Callable[[str, str], str | None]]] = [
        (DATA, check_data),
        (CHECKPOINTS, check_checkpoint),
        (TEXT_FILES, check_text_file),
        (OUT_FILES, check_out_file),
        (OUT_FOLDERS, check_out_folder),
    ]
    errors = []
    for table, check in checks:
        for key in table.get(schema, []):
            value = _get(cfg, key)
            if value is not None and (problem := check(key, str(value))):
                errors.append(problem)
    resume = getattr(getattr(cfg, "trainer", None), "resume", False)
    if isinstance(resume, str) and resume not in ("true", "false"):
        if problem := check_checkpoint("trainer.resume", resume):
            errors.append(problem)
    if errors:
        raise UserError("\n".join(errors))
