"""Running a command as several processes, without importing torch in the launching process: `trainer.nproc=N`
relaunches the command under torchrun, the processes agree on one run dir, and a failing rank is one line."""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from lmtrain.config.compose import first_line
from lmtrain.core.errors import UserError


def rank_failed(name: str, log_file: Path, rank: int, err: Exception) -> None:
    """One line naming the rank, before torchrun stops the others; the traceback goes to the log file."""
    with open(log_file, "a") as log:
        log.write(f"rank {rank}: {traceback.format_exc()}")
    line = first_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {first_line(err)}"
    print(f"lmtrain {name}: error: {line} (traceback in {log_file})", file=sys.stderr)
    sys.exit(2 if isinstance(err, UserError) else 1)


# torchrun, without its own report of a failed worker (a traceback of its own around the worker's error
# file): the failing rank has already printed its one line
TORCHRUN = """
import os, sys
level = os.environ.get("LOGLEVEL")
os.environ["LOGLEVEL"] = "CRITICAL"  # read once, when torch.distributed.elastic's loggers are made
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
os.environ.pop("LOGLEVEL") if level is None else os.environ.update(LOGLEVEL=level)
try:
    main(sys.argv[1:])
except ChildFailedError:
    sys.exit(1)
"""


def relaunch(nproc: int, argv: list[str]) -> int:
    """trainer.nproc=N: run this same command under torchrun with N local processes."""
    import subprocess

    command = [
        sys.executable,
        "-c",
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lmtrain",
        *argv,
    ]
    return subprocess.run(command).returncode


def shared_run_dir(command: str, overrides: list[str], trainer) -> list[str]:
    """Under torchrun every process must use one run dir: the main process picks it and tells the others;
    only the main process writes Hydra's files and logs."""
    from lmtrain.core import distributed

    distributed.init_process_group(trainer.device, trainer.dist_timeout_s, trainer.dist_join_timeout_s)
    extra = []
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        suffix = "" if command == "pretrain" else f"-{command}"
        extra.append(
            "hydra.run.dir=" + distributed.broadcast_object(time.strftime(f"outputs/%Y-%m-%d/%H-%M-%S{suffix}"))
        )
    if distributed.torchrun_rank() > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra
