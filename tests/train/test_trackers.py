"""Experiment trackers hold what metrics.jsonl holds, read back through the trackers' own clients: MLflow's
MlflowClient (a local SQLite store) and W&B's offline run files."""

import logging

import pytest
from conftest import TINY, compose, lmtrain

from lmtrain.commands import pretrain
from lmtrain.train import trackers
from lmtrain.train.sinks import read_metrics

mlflow = pytest.importorskip("mlflow")


def mlflow_history(uri: str, run_dir) -> tuple[dict, dict[str, list[tuple[int, float]]]]:
    """The MLflow run of `run_dir` (found by its tag): its params and each metric's (step, value) history."""
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lmtrain")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`lmtrain.run_dir` = '{run_dir}'")
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
        if not key.startswith("summary.")
    }
    return run, history


def jsonl_history(run_dir) -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in trackers.numbers(record).items():
            history.setdefault(key, []).append((record["step"], value))
    return history


def killed_then_resumed(overrides: list[str], run_dir, monkeypatch, kill_after: int) -> None:
    """A run killed after step `kill_after` was logged, then resumed with trainer.resume=true to its end."""
    from lmtrain.train.trainer import Trainer

    real_step = Trainer.train_step

    def killed(self, batches):
        if self.state.step == kill_after:
            raise KeyboardInterrupt
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(compose(*overrides), str(run_dir))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    pretrain.run(compose(*overrides, "trainer.resume=true"), str(run_dir))


def without_speed(history: dict) -> dict:
    """A history without what the clock measures: the step the killed attempt already sent keeps its speed."""
    return {key: values for key, values in history.items() if key not in ("tokens_per_s", "mfu")}


def test_mlflow_holds_metrics_jsonl_record_for_record_and_resume_continues_its_run(tmp_path, corpus, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [*TINY, f"data.train={corpus}", "trainer.loggers=[mlflow]", "optimizer.lr=0.002"]
    straight = tmp_path / "straight"
    pretrain.run(compose(*overrides), str(straight))
    run, history = mlflow_history(uri, straight)
    assert history == jsonl_history(straight)
    assert sorted(s for s, _ in history["loss"]) == [1, 2, 3, 4, 5, 6]
    assert run.data.params["optimizer.lr"] == "0.002" and run.data.params["model.d_model"]
    assert run.info.status == "FINISHED" and run.data.metrics["summary.steps"] == 6

    # killed after step 4 (its checkpoint is step 3, so steps 4's records reach the tracker twice): one run,
    # each step once, equal to metrics.jsonl
    resumed = tmp_path / "resumed"
    killed_then_resumed(overrides, resumed, monkeypatch, kill_after=4)
    run, history = mlflow_history(uri, resumed)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in history["val_loss"]] == [0, 3, 6]
    assert without_speed(history) == without_speed(jsonl_history(resumed))


def test_a_sweep_gives_one_tracker_run_per_job_in_one_experiment(tmp_path, corpus):
    import os

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    sweep_dir = tmp_path / "sweep"
    overrides = ["trainer.max_steps=2", "trainer.loggers=[mlflow]", "optimizer.lr=1e-3,2e-3"]
    result = lmtrain(
        "pretrain", "-m", *TINY, f"data.train={corpus}", *overrides, f"hydra.sweep.dir={sweep_dir}", env=env
    )
    assert result.returncode == 0, result.stderr
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lmtrain").experiment_id])
    assert sorted(r.data.params["optimizer.lr"] for r in runs) == ["0.001", "0.002"]
    assert {r.data.tags["lmtrain.sweep"] for r in runs} == {str(sweep_dir.resolve())}
    assert {r.data.tags["lmtrain.command"] for r in runs} == {"pretrain"}
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["sweep/0", "sweep/1"]


def test_a_failing_tracker_costs_one_warning_not_the_run(tmp_path, corpus, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    calls = []

    def server_gone(self, record, split):
        calls.append(record["step"])
        raise ConnectionError("server gone")

    monkeypatch.setattr(trackers.MLflowSink, "write", server_gone)
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        summary = pretrain.run(compose(*TINY, f"data.train={corpus}", "trainer.loggers=[mlflow]"), str(tmp_path / "r"))
    assert summary["steps"] == 6 and len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if "trainer.loggers" in r.getMessage()]
    assert warnings == [
        "trainer.loggers: mlflow failed to record step 0 (ConnectionError: server gone); the run goes on without it"
    ]
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_tracker_that_is_not_installed_is_one_line_at_config_time(monkeypatch):
    import importlib.util

    from lmtrain.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(
        ConfigError, match=r"trainer.loggers: wandb needs the wandb package: pip install 'lmtrain\[wandb\]'"
    ):
        compose(*TINY, "trainer.loggers=[wandb]")


def test_flat_params_name_every_key_by_its_path():
    flat = trackers.flat_params("a:\n  b: 1\n  c: [1, 2]\nd: null\ne: text\n")
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "null", "e": "text"}


def wandb_history(run_dir) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    """Every offline W&B run file under `run_dir/wandb` (one per attempt of a resumed run), decoded with W&B's
    own record type: the run ids and each key's (step, value) history."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    ids, history = set(), {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""  # a LevelDB-style log after W&B's 7-byte file header
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "run":
                    ids.add(record.run.run_id)
                if record.WhichOneof("record_type") == "history":
                    items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                    for key, value in items.items():
                        if not key.startswith("_"):
                            history.setdefault(key, []).append((items["_step"], value))
    return ids, history


def test_wandb_offline_run_holds_metrics_jsonl_and_resume_continues_it(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [*TINY, f"data.train={corpus}", "trainer.loggers=[wandb]", "trainer.max_steps=4"]
    overrides += ["trainer.checkpoint_every=2", "trainer.eval_every=2"]
    run_dir = tmp_path / "run"
    killed_then_resumed(overrides, run_dir, monkeypatch, kill_after=3)
    import wandb

    wandb.teardown()  # W&B's service writes the last records of its run files when it stops
    ids, history = wandb_history(run_dir)
    assert len(ids) == 1  # both attempts are one run
    assert [s for s, _ in history["loss"]] == [1, 2, 3, 4]
    assert without_speed(history) == without_speed(jsonl_history(run_dir))
