"""Files of a model folder that came from elsewhere (a Hugging Face download, a checkpoint someone sent): each
is read only where it resolves inside its folder, up to a size cap, and a safetensors header is checked against
the file's real size before any tensor is allocated. Every refusal is a one-line UserError naming the file.

The one place a file may resolve outside its folder is the Hugging Face cache's layout, where
`models--<org>--<name>/snapshots/<rev>/x` links to `../../blobs/<hash>`: there the model's cache folder
(`models--<org>--<name>`) is the boundary. Imports no torch."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import read_utf8

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# caps on what a model folder's metadata may weigh: several times the largest real ones
MAX_BYTES = {
    "tokenizer.json": 64 << 20,  # a 250k-entry BPE is ~20 MB
    "tokenizer_config.json": 16 << 20,  # tens of thousands of added tokens
    "model.safetensors.index.json": 16 << 20,
    "config.json": 4 << 20,
    "generation_config.json": 1 << 20,
    "chat_template.jinja": 1 << 20,
}
DEFAULT_MAX_BYTES = 4 << 20


def boundary(folder: Path) -> Path:
    """The folder the files of `folder` must resolve inside: itself, or for a snapshot in the Hugging Face
    cache, the model's cache folder (which holds `blobs/`)."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def folder_file(folder: Path, name: str, key: str) -> Path:
    """The real path of the plain file `name` of `folder`, refused (UserError) when it is missing, not a plain
    file, or resolves outside the folder (an absolute name, `..`, a symlink leading out)."""
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{key}: '{folder}' names the file {name!r}, which lies outside the folder")
    path = folder / name
    real = path.resolve()
    if not real.is_relative_to(boundary(folder)):
        raise UserError(f"{key}: '{path}' leads outside its folder; a model folder's files must lie inside it")
    if not real.exists():
        raise UserError(f"{key}: '{path}' is missing")
    if not real.is_file():
        raise UserError(f"{key}: '{path}' is not a plain file")
    return real


def read_folder_text(folder: Path, name: str, key: str, max_bytes: int | None = None) -> str:
    """The UTF-8 text of `folder`/`name`, at most `max_bytes` (default: MAX_BYTES for the name)."""
    cap = max_bytes or MAX_BYTES.get(name, DEFAULT_MAX_BYTES)
    return read_utf8(folder_file(folder, name, key), cap, key, folder / name)


def read_folder_json(folder: Path, name: str, key: str) -> dict[str, Any]:
    """A JSON object from `folder`/`name` (read as `read_folder_text` reads)."""
    try:
        value = json.loads(read_folder_text(folder, name, key))
    except (ValueError, RecursionError) as err:
        raise UserError(f"{key}: '{folder / name}' is damaged (not JSON: {str(err)[:200]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{key}: '{folder / name}' does not hold a JSON object")
    return value


def safetensors_shapes(path: Path, key: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, checked against the file's real size (so no shape can
    claim more bytes than the file holds). `path` must be a plain file (not a symlink)."""
    if path.is_symlink() or not path.is_file():
        raise UserError(f"{key}: '{path}' is {'a symlink' if path.is_symlink() else 'missing'}")
    size = path.stat().st_size
    damaged = f"{key}: '{path}' is damaged"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{damaged} (shorter than a safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{damaged} (its header claims {length:,} bytes of a {size:,}-byte file)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise UserError(f"{damaged} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{damaged} (its header is not a table of tensors)")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (start, stop) = entry["shape"], entry["data_offsets"]
            ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in [*shape, start, stop])
            ok = ok and stop - start == math.prod(shape) * DTYPE_BYTES[entry["dtype"]]
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{damaged} (tensor '{name}' has a malformed entry)")
        shapes[name], end = list(shape), max(end, stop)
    if 8 + length + end != size:
        raise UserError(f"{damaged} (it holds {size:,} bytes, its header describes {8 + length + end:,}; torn?)")
    return shapes
