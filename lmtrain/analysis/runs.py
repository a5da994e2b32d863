"""A run dir read back as a record (`Run`: result.json, metrics, overrides), for `lmtrain report` and its plots."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.train.sinks import read_metrics
from lmtrain.train.sweep import RESULT_FILE

log = logging.getLogger("lmtrain")


@dataclass
class Run:
    path: Path
    name: str
    overrides: dict[str, str]
    result: dict
    metrics: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.result.get("status", "incomplete")

    @property
    def objective(self) -> float | None:
        return self.result.get("objective")


def load_run(path: Path, name: str) -> Run:
    metrics = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    result = {}
    if (path / RESULT_FILE).is_file():
        try:
            result = json.loads((path / RESULT_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # cut off by a kill or a full disk
            log.warning("%s: %s is damaged; summarising the run from its metrics.jsonl", name, RESULT_FILE)
        if not isinstance(result, dict):
            result = {}
    if not result:  # still running, or killed: summarise from its metrics
        val = [r["val_loss"] for r in metrics if "val_loss" in r and r["step"] > 0]
        steps = [r["step"] for r in metrics]
        result = {
            "status": "incomplete",
            "metric": "val_loss",
            "objective": min(val) if val else None,
            "best_val_loss": min(val) if val else None,
            "final_val_loss": val[-1] if val else None,
            "steps": max(steps) if steps else 0,
        }
    return Run(path, name, _overrides(path, result), result, metrics)


def _overrides(path: Path, result: dict) -> dict[str, str]:
    listed = result.get("overrides")
    if listed is None and (path / ".hydra" / "overrides.yaml").is_file():
        listed = [
            line[2:].strip()
            for line in (path / ".hydra" / "overrides.yaml").read_text().splitlines()
            if line.startswith("- ")
        ]
    pairs = (item.split("=", 1) for item in listed or [] if "=" in item)
    return {key.lstrip("+~"): value.strip("'\"") for key, value in pairs if not key.startswith("hydra.")}
