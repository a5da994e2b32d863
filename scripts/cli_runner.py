"""Run the `lmtrain` CLI from a benchmark script, as a user would, timing each command."""

from __future__ import annotations

import subprocess
import sys
import time


def lmtrain(*args: str) -> str:
    """Run `lmtrain <args>`; stop the script with the command's stderr if it fails. Returns its stdout."""
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "lmtrain", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"lmtrain {args[0]} failed:\n{result.stderr[-3000:]}")
    print(f"  lmtrain {args[0]}: {time.time() - started:.0f} s", flush=True)
    return result.stdout
