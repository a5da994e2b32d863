"""Where a run's records go: every sink gets every record with the split it belongs to. `metrics.jsonl` is
the record of truth (its one writer and its one reader are here); TensorBoard is a second sink. A new sink
(an experiment tracker) implements `Sink` and is added to `open_sinks`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Protocol

from lmtrain.config import TrainerConfig
from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import write_text_atomic, writing

log = logging.getLogger("lmtrain")
SPLITS = ("data", "train", "val")  # data: the step-0 counts of the data set; train: a log window; val: a validation


class Sink(Protocol):
    def write(self, record: dict, split: str) -> None:
        """Take one record ({"step": int, name: number, ...}) of `split` (one of SPLITS)."""

    def summary(self, values: dict) -> None:
        """Take the finished run's summary (the result.json numbers); not called when the run fails."""

    def close(self) -> None: ...


class JsonlSink:
    """Appends records to `metrics.jsonl`. On resume from step k, records after k (from the interrupted tail of
    the earlier attempt) are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [record for record in read_metrics(path) if record["step"] <= resume_step]
            # the old history stays whole until the new one is in place
            write_text_atomic(path, "".join(to_json_line(record) for record in kept))
        elif path.exists():
            path.unlink()
        with writing(path):
            self.file = open(path, "a")

    def write(self, record: dict, split: str) -> None:
        with writing(self.path):
            self.file.write(to_json_line(record))
            self.file.flush()

    def summary(self, values: dict) -> None:
        pass  # result.json holds it

    def close(self) -> None:
        with writing(self.path):
            self.file.close()


class TensorBoardSink:
    """Scalars as `<split>/<name>` (val_loss -> val/loss) in a TensorBoard event folder."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "trainer.tensorboard=true needs the tensorboard package: pip install 'lmtrain[tensorboard]'"
            ) from None
        # purge_step drops events an interrupted attempt wrote after the checkpoint we resume from
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(folder), purge_step=purge)

    def write(self, record: dict, split: str) -> None:
        for key, value in record.items():
            if key != "step" and value is not None:
                self.writer.add_scalar(f"{split}/{key.removeprefix('val_')}", value, record["step"])

    def summary(self, values: dict) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


class Sinks:
    """All of a run's sinks as one; processes other than the main one hold none and write nothing."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def write(self, record: dict, split: str) -> None:
        assert split in SPLITS, split
        for sink in self.sinks:
            sink.write(record, split)

    def summary(self, values: dict) -> None:
        for sink in self.sinks:
            sink.summary(values)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # close every sink; report the first failure
                errors.append(err)
        if errors:
            raise errors[0]


def open_sinks(
    run_dir: Path, resume_step: int | None, settings: TrainerConfig, config_yaml: str, main: bool = True
) -> Sinks:
    """metrics.jsonl (kept up to `resume_step` when resuming), TensorBoard events under `run_dir/tensorboard` and
    the trackers `settings.loggers` names, on the main process; nothing elsewhere."""
    if not main:
        return Sinks([])
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl", resume_step)]
    if settings.tensorboard or "tensorboard" in settings.loggers:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", resume_step))
    trackers = [name for name in ("mlflow", "wandb") if name in settings.loggers]
    if trackers:
        from lmtrain.train.trackers import open_trackers

        resuming = resume_step is not None
        sinks += open_trackers(trackers, run_dir, resuming, settings.run_name, settings.experiment, config_yaml)
    return Sinks(sinks)


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
