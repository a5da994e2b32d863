"""One process per run dir: an advisory lock on `<run dir>/.lock`, held for the run's life.

The lock is `fcntl.flock` on an open file, so the kernel releases it when the process exits in any way
(SIGKILL included): a lock file left by a dead process is stale by construction and is simply taken over.
The file holds the holder's pid, host and command, for the one-line refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lmtrain.core.errors import RunRefused

LOCK_FILE = ".lock"


class RunDirBusy(RunRefused):
    """Another live process holds the run dir."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def locked(run_dir: Path, key: str = "hydra.run.dir") -> Iterator[None]:
    """Hold the run dir's lock for the block; a UserError (RunDirBusy) naming the holder if a live process has it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{key}: '{run_dir}' is in use by {_holder(path)}; wait for it to end or choose another {key}"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": os.path.basename(sys.argv[0]) if sys.argv else "lmtrain",
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
