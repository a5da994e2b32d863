"""Runs many `lmtrain` command lines as the real CLI does, each in a forked child: read a JSON list of
argument lists on stdin, print a JSON list of {"rc", "stderr", "stdout"}. The imports (Hydra, torch) are
paid once in the parent, so each bad input costs only its own checks. Used by tests/config/test_bad_inputs.py.

Stdin may instead hold {"cases": [...], "memory": bytes, "cpu_seconds": s, "watch": folder}: each child may
then map at most `memory` bytes beyond what the parent holds (RLIMIT_AS), use `cpu_seconds` of CPU
(RLIMIT_CPU: past it the child is killed), and any file it opens under `watch` is reported on its stderr
("OPENED <path>", through the interpreter's audit hook). Used by tests/hf/test_untrusted_folders.py."""

import json
import os
import resource
import sys
import tempfile
import time
import traceback

import torch  # noqa: F401  (imported once before forking, so each child starts warm)

import lmtrain.commands.evaluate  # noqa: F401
import lmtrain.commands.finetune  # noqa: F401
import lmtrain.commands.generate  # noqa: F401
import lmtrain.commands.predict  # noqa: F401
import lmtrain.commands.pretrain  # noqa: F401
from lmtrain.cli import main


def _limit(memory: int | None = None, cpu_seconds: int | None = None, watch: str | None = None) -> None:
    if memory:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, mapped + memory))
    if cpu_seconds:
        used = int(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]))
        resource.setrlimit(resource.RLIMIT_CPU, (used + cpu_seconds, used + cpu_seconds))
    if watch:

        def audit(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
                path = os.path.realpath(os.fsdecode(args[0]))
                if path.startswith(watch):
                    os.write(2, f"OPENED {path}\n".encode())

        sys.addaudithook(audit)


def run_one(argv: list[str], limits: dict | None = None) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child: stdout/stderr to the files, exit status as the CLI's
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            code = 1
            _limit(**(limits or {}))
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
        started = time.perf_counter()
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        seconds = time.perf_counter() - started
        return {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read(), "seconds": seconds}


if __name__ == "__main__":
    torch.set_num_threads(1)
    with torch.device("meta"):  # torch loads its meta kernels on first use (seconds): once, before forking
        torch.nn.Embedding(1, 1)
    given = json.load(sys.stdin)
    if isinstance(given, dict):
        limits = {k: given.get(k) for k in ("memory", "cpu_seconds", "watch")}
        print(json.dumps([run_one(argv, limits) for argv in given["cases"]]))
    else:
        print(json.dumps([run_one(argv) for argv in given]))
