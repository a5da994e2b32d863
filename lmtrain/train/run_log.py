"""What a run tells its user: `metrics.jsonl` (one JSON object per record; its one reader), the tqdm progress
bar, and a finished run read back as a record (`Run`: result.json, metrics, overrides) for `lmtrain report`."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import write_text_atomic, writing
from lmtrain.train.sweep import RESULT_FILE

log = logging.getLogger("lmtrain")


class MetricsFile:
    """Appends records to `metrics.jsonl` (and, optionally, TensorBoard). On resume from step k, records
    after k (from the interrupted tail of the earlier attempt) are dropped so the file reads as one
    uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = path
        self.tensorboard = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "trainer.tensorboard=true needs the tensorboard package: pip install 'lmtrain[tensorboard]'"
                ) from None
            # purge_step drops events an interrupted attempt wrote after the checkpoint we resume from
            purge = resume_step + 1 if resume_step is not None else None
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=purge)
        if resume_step is not None and path.exists():
            kept = [record for record in read_metrics(path) if record["step"] <= resume_step]
            # the old history stays whole until the new one is in place
            write_text_atomic(path, "".join(to_json_line(record) for record in kept))
        elif path.exists():
            path.unlink()
        with writing(path):
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        with writing(self.path):
            self.file.write(to_json_line(record))
            self.file.flush()
        if self.tensorboard is not None:
            prefix = "val" if "val_loss" in record else "train"
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(f"{prefix}/{key.removeprefix('val_')}", value, record["step"])

    def close(self) -> None:
        try:
            with writing(self.path):
                self.file.close()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()


def to_json_line(record: dict) -> str:
    """One record as a line of strict JSON: a non-finite number (a diverged loss) is written as null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`: the one reader of the file. A torn last line (a run killed, or a disk
    that filled, mid-write) is dropped with a warning; a damaged line before it is a UserError."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(rest.strip() for rest in lines[number:]):
                raise UserError(f"'{path}' is damaged at line {number} (not a metrics record)") from None
            log.warning("%s: dropped a torn last line (line %d, %d bytes)", path, number, len(line))
            break
        records.append(record)
    return records


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool, main: bool = True):
        self.main = main  # only the main process draws the bar and prints
        # disable=None: draw only on a terminal, so logs and CI stay clean.
        self.bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None if enabled and main else True
        )

    def update(self, steps: int, record: dict | None = None) -> None:
        self.bar.update(steps)
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
                refresh=False,
            )

    def write(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


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
