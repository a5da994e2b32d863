"""Runs many `lmtrain` command lines as the real CLI does, each in a forked child: read a JSON list of
argument lists on stdin, print a JSON list of {"rc", "stderr", "stdout"}. The imports (Hydra, torch) are
paid once in the parent, so each bad input costs only its own checks. Used by tests/test_bad_inputs.py."""

import json
import os
import sys
import tempfile
import traceback

import torch  # noqa: F401  (imported once before forking, so each child starts warm)

import lmtrain.commands.evaluate  # noqa: F401
import lmtrain.commands.finetune  # noqa: F401
import lmtrain.commands.generate  # noqa: F401
import lmtrain.commands.predict  # noqa: F401
import lmtrain.commands.pretrain  # noqa: F401
from lmtrain.cli import main


def run_one(argv: list[str]) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child: stdout/stderr to the files, exit status as the CLI's
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            code = 1
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps([run_one(argv) for argv in json.load(sys.stdin)]))
