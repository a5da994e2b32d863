"""Files that are either whole or absent: atomic text writes, one-line errors for a full disk, capped reads
of files that came from elsewhere (checkpoint metadata). Imports no torch: the CLI and `report` use it."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from lmtrain.core.errors import UserError

# Errors that say "this machine cannot take the write", not "lmtrain has a bug": one line, no traceback.
_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a full disk (or quota, read-only file system, permission) while writing `path` into a one-line
    UserError naming the file and the cause."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write '{path}': {err.strerror or os.strerror(err.errno)}") from err
    except SafetensorError as err:  # safetensors reports the OS error in its message: "... (os error 28)"
        found = _OS_ERROR.search(str(err))
        code = int(found.group(1) or found.group(2)) if found else None
        if code not in WRITE_ERRNOS:
            raise
        raise UserError(f"cannot write '{path}': {os.strerror(code)}") from err


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def share(path: Path) -> None:
    """Give `path` the mode the user's umask gives any new file or folder (mkdtemp and some writers make
    them private)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary file renamed over it: readers see the old content or the new one,
    never a torn mix. A full disk is a one-line UserError and leaves the old file as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of `write_text_atomic` a killed process left in `folder` (the caller knows no
    live process writes there). Returns what was removed."""
    removed = [path for path in folder.glob(".*.tmp-*") if path.is_file() and not path.is_symlink()]
    for path in removed:
        path.unlink()
    return removed


def read_text_capped(path: Path, max_bytes: int, key: str) -> str:
    """The text of a file that came from elsewhere: no symlinks, no devices or pipes, at most `max_bytes`.
    Each refusal is a UserError naming `key` and the file."""
    if path.is_symlink():
        raise UserError(f"{key}: '{path}' is a symlink; a checkpoint's files must be plain files")
    if not path.exists():
        raise UserError(f"{key}: '{path}' is missing")
    if not path.is_file():
        raise UserError(f"{key}: '{path}' is not a plain file")
    return read_utf8(path, max_bytes, key)


def read_utf8(path: Path, max_bytes: int, key: str, shown: Path | None = None) -> str:
    """At most `max_bytes` of `path` as UTF-8 text. UserError naming `key` and the file (`shown`, default
    `path`) when it is larger or not UTF-8."""
    shown = shown or path
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{key}: '{shown}' is larger than {max_bytes:,} bytes, more than such a file ever holds")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UserError(f"{key}: '{shown}' is damaged (not UTF-8 text)") from None
