"""Runs as members of a sweep: each run dir's `result.json`, and the end-of-sweep verdict.

Imported by the CLI and by Hydra (as a callback) before any training: it must not import torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lmtrain.core.safe_io import write_text_atomic

RESULT_FILE = "result.json"


def write_result(run_dir: Path, status: str, summary: dict[str, Any], overrides: list[str]) -> dict:
    """Write `result.json`: status ("completed" | "failed") and the run's summary numbers."""
    result = {"status": status, "overrides": list(overrides), **summary}
    result = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def read_results(sweep_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(sweep_dir.rglob(RESULT_FILE)):
        try:
            found.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return found


class SweepSummary(Callback):
    """After a multirun: one line per failed job, and a non-zero exit status when any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = read_results(sweep_dir)
        failed = [(path, r) for path, r in results if r.get("status") != "completed"]
        print(
            f"sweep: {len(results) - len(failed)} of {len(results)} jobs completed in {sweep_dir}; "
            f"compare them with: lmtrain report {sweep_dir}",
            file=sys.stderr,
        )
        for path, result in failed:
            print(f"sweep: job {path.relative_to(sweep_dir)} failed: {result.get('error')}", file=sys.stderr)
        if failed:
            raise SystemExit(1)
