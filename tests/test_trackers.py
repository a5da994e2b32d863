"""Experiment trackers hold what metrics.jsonl holds, read back through the trackers' own clients: MLflow's
MlflowClient (a local SQLite store) and W&B's offline run files."""

import logging

import pytest
from conftest import TINY, compose

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
    from lmtrain.train.trainer import Trainer

    real_step = Trainer.train_step

    def killed(self, batches):
        if self.state.step == 4:
            raise KeyboardInterrupt
        return real_step(self, batches)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(compose(*overrides), str(resumed))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    pretrain.run(compose(*overrides, "trainer.resume=true"), str(resumed))
    run, history = mlflow_history(uri, resumed)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in history["val_loss"]] == [0, 3, 6]
    assert {k: v for k, v in history.items() if k not in ("tokens_per_s", "mfu")} == {
        k: v for k, v in jsonl_history(resumed).items() if k not in ("tokens_per_s", "mfu")
    }


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
