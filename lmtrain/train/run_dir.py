"""The run dir's contract: created and locked for the run's life, cleaned of what an interrupted run left,
and what an interrupted run left in it removed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from lmtrain.checkpoint import files as checkpoint
from lmtrain.core import distributed
from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import clean_temporaries, write_text_atomic
from lmtrain.train import run_lock

log = logging.getLogger("lmtrain")


def prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"hydra.run.dir: cannot create '{run_dir}': {err.strerror}") from None


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[None]:
    """The run dir, created if needed and locked for the block by the main process (RunDirBusy if another
    live process holds it)."""
    prepare_run_dir(run_dir)
    if distributed.torchrun_rank() != 0:
        yield
        return
    with run_lock.locked(run_dir):
        yield


def take_over(run_dir: Path, tokenizer_json: str) -> None:
    """The point after which a run writes into its dir (everything it could refuse has been checked): remove
    what an interrupted run left and write the run's tokenizer."""
    for path in [*clean_temporaries(run_dir), *checkpoint.clean_leftovers(run_dir / "checkpoints")]:
        log.warning("removed %s: left by an interrupted run", path)
    write_text_atomic(run_dir / "tokenizer.json", tokenizer_json)
