"""Experiment trackers as sinks: MLflow and Weights & Biases get the composed config as parameters, every
record with its step, the run's summary at the end, and tags for the command, the project's git commit and the
sweep. Only the main process writes. `metrics.jsonl` stays the record of truth: a tracker that fails (server
gone, disk full) costs one warning and is dropped, never the run.

A resumed run continues the same tracker run: its id is kept in `<run dir>/trackers.json` together with the last
step each tracker was sent, so the records between the checkpoint and the kill (which an exact resume writes
again, equal) are not sent twice."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Literal, cast

from omegaconf import OmegaConf

from lmtrain.core.safe_io import write_text_atomic

log = logging.getLogger("lmtrain")
TRACKERS_FILE = "trackers.json"
INSTALL = {"mlflow": "pip install 'lmtrain[mlflow]'", "wandb": "pip install 'lmtrain[wandb]'"}


def run_tags(run_dir: Path) -> dict[str, str]:
    """command (pretrain/finetune), the git commit of the working directory's project (if any), and the sweep's
    folder for a job of a `-m` sweep."""
    tags = {"lmtrain.run_dir": str(run_dir)}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        tags["lmtrain.command"] = str(hydra.job.config_name)
        if hydra.mode == RunMode.MULTIRUN:
            tags["lmtrain.sweep"] = str(Path(hydra.sweep.dir).resolve())
    except ValueError:  # composed without Hydra's app (tests, scripts)
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["lmtrain.git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def flat_params(config_yaml: str) -> dict[str, str]:
    """The composed config as `a.b.c -> value text` pairs (lists and nulls as their YAML/JSON text)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) or value is None else str(value)

    walk("", OmegaConf.to_container(OmegaConf.create(config_yaml)))
    return flat


def numbers(record: dict) -> dict[str, float]:
    """The record's finite numbers but its step (a non-finite loss is left out, as in metrics.jsonl's null)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


class TrackerState:
    """`trackers.json`: per tracker, its run id and the last step it was sent (with the splits sent at that
    step, since a step can carry a training and a validation record)."""

    def __init__(self, run_dir: Path, resuming: bool):
        self.path = run_dir / TRACKERS_FILE
        self.state: dict[str, dict] = {}
        if resuming and self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
            except (ValueError, OSError):
                log.warning("%s is damaged: the trackers start new runs", self.path)

    def get(self, tracker: str) -> dict:
        return self.state.get(tracker, {})

    def put(self, tracker: str, **values) -> None:
        self.state[tracker] = {**self.get(tracker), **values}
        write_text_atomic(self.path, json.dumps(self.state, indent=2) + "\n")


class Sent:
    """Which records a tracker already holds: on resume, those the killed attempt sent after the checkpoint."""

    def __init__(self, state: TrackerState, tracker: str):
        self.state, self.tracker = state, tracker
        known = state.get(tracker)
        self.resumed_at = (known.get("last_step", -1), set(known.get("last_splits", [])))
        self.step, self.splits = self.resumed_at[0], set(self.resumed_at[1])

    def already(self, step: int, split: str) -> bool:
        last, splits = self.resumed_at
        return step < last or (step == last and split in splits)

    def mark(self, step: int, split: str) -> None:
        self.splits = self.splits | {split} if step == self.step else {split}
        self.step = step
        self.state.put(self.tracker, last_step=step, last_splits=sorted(self.splits))


class MLflowSink:
    """One MLflow run. The store is $MLFLOW_TRACKING_URI, else a local SQLite file `mlflow.db` in the working
    directory (MLflow's recommended local store); the experiment is `trainer.experiment`."""

    finished = False

    def __init__(self, run_dir: Path, state: TrackerState, name: str, experiment: str, config_yaml: str):
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.client = MlflowClient(uri)
        known = state.get("mlflow")
        self.sent = Sent(state, "mlflow")
        if known.get("run_id"):
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = run_tags(run_dir)
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(config_yaml).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        state.put("mlflow", run_id=self.run_id)

    def write(self, record: dict, split: str) -> None:
        step = record["step"]
        if self.sent.already(step, split):
            return
        stamp = int(time.time() * 1000)
        metrics = [self.Metric(key, value, stamp, step) for key, value in numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.sent.mark(step, split)

    def summary(self, values: dict) -> None:
        self.client.log_batch(
            self.run_id,
            metrics=[self.Metric(f"summary.{k}", v, int(time.time() * 1000), 0) for k, v in numbers(values).items()],
        )
        self.finished = True

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "FAILED")


def _wandb_mode() -> Literal["online", "offline", "disabled", "shared"]:
    """$WANDB_MODE when set; online when an API key is configured ($WANDB_API_KEY or `wandb login`'s netrc
    entry); offline otherwise (`wandb sync <run dir>/wandb/offline-run-*` uploads it later)."""
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled", "shared"):
        return cast(Literal["online", "offline", "disabled", "shared"], os.environ["WANDB_MODE"])
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbSink:
    """One W&B run in project `trainer.experiment`, grouped by sweep; files under `<run dir>/wandb`."""

    def __init__(self, run_dir: Path, state: TrackerState, name: str, experiment: str, config_yaml: str):
        import wandb

        known = state.get("wandb")
        self.sent = Sent(state, "wandb")
        tags = run_tags(run_dir)
        self.run = wandb.init(
            project=experiment,
            name=name,
            id=known.get("run_id"),
            resume="allow" if known.get("run_id") else None,
            group=tags.get("lmtrain.sweep"),
            job_type=tags.get("lmtrain.command"),
            tags=[f"{k.removeprefix('lmtrain.')}:{v}"[:64] for k, v in tags.items() if k != "lmtrain.run_dir"],
            config=None if known.get("run_id") else flat_params(config_yaml),
            dir=str(run_dir),
            mode=_wandb_mode(),
            reinit="create_new",
        )
        if not known.get("run_id"):
            state.put("wandb", run_id=self.run.id)

    def write(self, record: dict, split: str) -> None:
        step = record["step"]
        if self.sent.already(step, split):
            return
        self.run.log(numbers(record), step=step)
        self.sent.mark(step, split)

    def summary(self, values: dict) -> None:
        self.run.summary.update(numbers(values))

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"mlflow": MLflowSink, "wandb": WandbSink}


class Guarded:
    """A tracker whose first failure is one warning, after which it is dropped: the run goes on."""

    def __init__(self, name: str, build):
        self.name, self.sink = name, None
        self._call(lambda: setattr(self, "sink", build()), "start")

    def _call(self, action, what: str) -> None:
        try:
            action()
        except Exception as err:  # a tracker's failure of any kind must not cost the run
            log.warning(
                "trainer.loggers: %s failed to %s (%s: %s); the run goes on without it",
                self.name,
                what,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            self.sink = None

    def write(self, record: dict, split: str) -> None:
        if self.sink is not None:
            self._call(lambda: self.sink.write(record, split), f"record step {record['step']}")

    def summary(self, values: dict) -> None:
        if self.sink is not None:
            self._call(lambda: self.sink.summary(values), "record the summary")

    def close(self) -> None:
        if self.sink is not None:
            self._call(self.sink.close, "close")


def open_trackers(
    names: list[str], run_dir: Path, resuming: bool, run_name: str | None, experiment: str, config_yaml: str
) -> list[Guarded]:
    """A guarded sink per tracker named in `trainer.loggers`."""
    state = TrackerState(run_dir, resuming)
    name = run_name or f"{run_dir.parent.name}/{run_dir.name}"
    return [
        Guarded(tracker, lambda cls=TRACKERS[tracker]: cls(run_dir, state, name, experiment, config_yaml))
        for tracker in names
    ]
