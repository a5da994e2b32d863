"""Runs never lose or corrupt anything: one test per fault of issue 13 (kills are simulated by raising inside
the write, or by SIGKILL of a subprocess)."""

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TINY, compose, lmtrain
from safetensors.torch import load_file

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint import resume
from lmtrain.checkpoint.load import load_model
from lmtrain.commands import pretrain
from lmtrain.core import safe_io
from lmtrain.core.errors import Diverged, RunRefused, UserError
from lmtrain.train import run_lock
from lmtrain.train.sinks import JsonlSink, read_metrics
from lmtrain.train.trainer import Trainer


def train(run_dir, corpus, *extra):
    return pretrain.run(compose(*TINY, f"data.train={corpus}", *extra), str(run_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A finished 6-step run with checkpoints at steps 3 and 6 (copy it before damaging it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(run_dir, corpus, "trainer.keep_last=0")
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def strict_records(path):
    """metrics.jsonl parsed as strict JSON: a bare NaN or Infinity fails."""

    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def finite_weights(run_dir) -> bool:
    return all(
        torch.isfinite(t).all() for t in load_file(str(checkpoint.resolve(run_dir) / "model.safetensors")).values()
    )


def nan_from_step(monkeypatch, bad_step):
    """The loss (and so the gradient) of optimizer step `bad_step` onwards is NaN."""
    real = Trainer.loss

    def loss(self, batch):
        value = real(self, batch)
        return value * float("nan") if self.state.step + 1 >= bad_step else value

    monkeypatch.setattr(Trainer, "loss", loss)


# 1. divergence
def test_divergence_stops_at_the_step_and_keeps_the_last_finite_checkpoint(tmp_path, corpus, monkeypatch):
    nan_from_step(monkeypatch, 5)
    with pytest.raises(
        Diverged, match=r"non-finite loss or gradient norm at step 5; .*step_0000003 is the last finite"
    ):
        train(tmp_path, corpus, "trainer.log_every=2", "trainer.keep_last=1")
    assert checkpoint.resolve(tmp_path).name == "step_0000003"  # pruning kept it; no NaN checkpoint was written
    assert all(
        torch.isfinite(t).all() for t in load_file(str(tmp_path / "checkpoints/latest/model.safetensors")).values()
    )
    records = strict_records(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 6 and records[-1]["loss"] is None and records[-1]["grad_norm"] is None


def test_real_divergence_exits_non_zero_with_one_line(tmp_path, corpus):
    result = lmtrain(
        "pretrain",
        *TINY,
        "trainer.max_steps=12",
        "scheduler=constant",
        "scheduler.warmup_steps=0",
        "optimizer.lr=1e4",
        "optimizer.grad_clip=0",
        f"data.train={corpus}",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "lmtrain pretrain: error: training diverged: non-finite" in errors[0]
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"
    strict_records(tmp_path / "metrics.jsonl")


def test_on_nonfinite_skip_skips_and_counts(tmp_path, corpus, monkeypatch):
    real = Trainer.loss

    def loss(self, batch):  # only step 5 is bad
        value = real(self, batch)
        return value * float("nan") if self.state.step + 1 == 5 else value

    monkeypatch.setattr(Trainer, "loss", loss)
    summary = train(tmp_path, corpus, "trainer.on_nonfinite=skip")
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 0, 0, 1, 1]
    assert all(
        torch.isfinite(t).all() for t in load_file(str(tmp_path / "checkpoints/latest/model.safetensors")).values()
    )


# 2. a torn last line of metrics.jsonl
def test_torn_metrics_tail_is_dropped_on_resume(run_copy, corpus, caplog):
    path = run_copy / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"step": 7, "lo')
    with caplog.at_level(logging.WARNING, "lmtrain"):
        train(run_copy, corpus, "trainer.resume=true", "trainer.max_steps=7")
    assert "dropped a torn last line" in caplog.text
    assert [r["step"] for r in read_metrics(path) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]


def test_damage_before_the_last_line_is_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(UserError, match="metrics.jsonl' is damaged at line 2"):
        read_metrics(path)


# 3. the rewrite on resume is atomic
def test_killed_metrics_rewrite_keeps_the_old_history(run_copy, monkeypatch):
    path = run_copy / "metrics.jsonl"
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies inside the rewrite

    monkeypatch.setattr(safe_io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        JsonlSink(path, resume_step=3)
    assert path.read_text() == before
    # a kill (unlike this exception) leaves the temporary file: the next run in the dir removes it
    (run_copy / ".metrics.jsonl.tmp-999").write_text('{"step": 0}\n')
    assert [p.name for p in safe_io.clean_temporaries(run_copy)] == [".metrics.jsonl.tmp-999"]
    assert [p.name for p in run_copy.iterdir() if ".tmp" in p.name] == []


# 4. one process per run dir
def test_a_run_dir_in_use_is_refused_and_names_the_holder(tmp_path, corpus):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lmtrain.train.run_lock import locked\n"
            "with locked(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunRefused, match=f"'{tmp_path}' is in use by process {holder.pid} on "):
            train(tmp_path, corpus)
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tokenizer.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: its stale lock file does not block the next run
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == holder.pid
    with run_lock.locked(tmp_path):
        pass


def test_the_lock_is_released_when_the_run_fails(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", lambda self, batches: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, corpus)
    with run_lock.locked(tmp_path):
        pass


# 5. a refused command leaves the run's record alone
def test_refusals_do_not_rewrite_result_or_tokenizer(tmp_path, corpus):
    args = ["pretrain", *TINY, "trainer.max_steps=3", f"data.train={corpus}", f"hydra.run.dir={tmp_path}"]
    assert lmtrain(*args).returncode == 0
    result, tokenizer = (tmp_path / "result.json").read_text(), (tmp_path / "tokenizer.json").read_text()
    hydra = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / ".hydra").iterdir()}
    again = lmtrain(*args)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    assert (tmp_path / "result.json").read_text() == result
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / ".hydra").iterdir()} == hydra
    assert not list(tmp_path.glob(".hydra.kept-*"))
    # 12. a resume that does not fit names what differs
    with pytest.raises(RunRefused, match=r"the tokenizer in .* differs .*data.tokenizer: 'char' there, 'byte' here"):
        train(tmp_path, corpus, "trainer.resume=true", "data.tokenizer=byte")
    assert (tmp_path / "tokenizer.json").read_text() == tokenizer


# 6. a full disk
def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_in_a_checkpoint_write_is_one_line(run_copy, corpus, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(
        UserError, match=r"cannot write '.*step_0000009/optimizer.safetensors': No space left on device"
    ):
        train(run_copy, corpus, "trainer.resume=true", "trainer.max_steps=9")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]
    strict_records(run_copy / "metrics.jsonl")


def test_full_disk_in_metrics_and_result_is_one_line(tmp_path, monkeypatch):
    metrics = JsonlSink(tmp_path / "metrics.jsonl")
    metrics.write({"step": 1, "loss": 1.0}, "train")
    monkeypatch.setattr(metrics.file, "write", disk_full)
    with pytest.raises(UserError, match="cannot write '.*metrics.jsonl': No space left on device"):
        metrics.write({"step": 2, "loss": 1.0}, "train")
    monkeypatch.undo()
    metrics.close()

    from lmtrain.train.sweep import write_result

    write_result(tmp_path, "completed", {"objective": 1.0}, [])
    before = (tmp_path / "result.json").read_text()
    monkeypatch.setattr(safe_io.os, "fsync", disk_full)
    with pytest.raises(UserError, match="cannot write '.*result.json': No space left on device"):
        write_result(tmp_path, "failed", {}, [])
    assert (tmp_path / "result.json").read_text() == before  # whole, and the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "result.json"]


# 7. checkpoint metadata is untrusted input
@pytest.mark.parametrize(
    "damage, said",
    [
        ({"num_layers": 1000000}, "does not match .* 2 blocks; model.json says .* 1000000 blocks"),
        ({"d_model": 10**9}, r"does not match .*model.json says \[21, 1000000000\]"),
        ({"d_model": -4}, "d_model must be in 1..2147483648, got -4"),
        ({"num_heads": "4"}, "num_heads must be in 1..2147483648, got '4'"),
        ({"d_ff": 7}, "tensor 'blocks.0.ffn.down.weight' is .* model.json implies"),
        ("torn", "model.json' is damaged .not JSON"),
        ("symlink", "model.json' is a symlink"),
        ("tokenizer", "tokenizer.json' is damaged .not a tokenizer"),
        ("tokenizer symlink", "tokenizer.json' is a symlink"),
    ],
)
def test_checkpoint_metadata_is_checked_before_allocating(run_copy, damage, said):
    source = checkpoint.resolve(run_copy)
    model_json = source / "model.json"
    if isinstance(damage, dict):
        model_json.write_text(json.dumps({**json.loads(model_json.read_text()), **damage}))
    elif damage == "torn":
        model_json.write_text(model_json.read_text()[:20])
    elif damage == "symlink":
        model_json.unlink()
        model_json.symlink_to("/dev/zero")
    elif damage == "tokenizer":
        (source / "tokenizer.json").write_text("not json")
    else:
        (source / "tokenizer.json").unlink()
        (source / "tokenizer.json").symlink_to("/dev/zero")
    with pytest.raises(UserError, match=f"ckpt: .*{said}"):
        load_model(str(run_copy), torch.device("cpu"))


def test_non_integer_step_in_trainer_state_is_refused(run_copy):
    state_file = checkpoint.resolve(run_copy) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["trainer"]["step"] = "six"
    state_file.write_text(json.dumps(state))
    with pytest.raises(RunRefused, match="trainer.step must be a non-negative integer, got 'six'"):
        resume.resume_source(str(state_file.parent), run_copy / "other")


# 8. fallback to the newest valid checkpoint; 9. leftovers are cleaned
def test_resume_falls_back_past_a_damaged_checkpoint_and_cleans_leftovers(run_copy, corpus, caplog):
    root = run_copy / "checkpoints"
    weights = root / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # torn
    checkpoint.prune(root, keep_last=1)  # pruning never deletes the newest valid checkpoint
    assert (root / "step_0000003").is_dir()
    (root / ".latest.tmp-999").symlink_to("step_0000003")
    (root / ".step_0000009.tmp-abc").mkdir()
    (root / "step_0000012").mkdir()
    (root / "step_0000012" / "config.yaml").write_text("model: {}\n")
    (run_copy / ".metrics.jsonl.tmp-999").write_text('{"step": 0}\n')  # killed inside the metrics rewrite
    with caplog.at_level(logging.WARNING, "lmtrain"):
        assert resume.resume_source(True, run_copy) == root / "step_0000003"
        train(run_copy, corpus, "trainer.resume=true", "trainer.max_steps=7")
    assert "skipping damaged checkpoint" in caplog.text and "step_0000006" in caplog.text
    assert "torn?" in caplog.text
    names = sorted(p.name for p in root.iterdir())
    assert names == [".abandoned-step_0000006", "latest", "step_0000006", "step_0000007"]  # 6 retrained
    for left in (".latest.tmp-999", ".step_0000009.tmp-abc", "step_0000012", "../.metrics.jsonl.tmp-999"):
        assert f"removed {os.path.normpath(root / left)}" in caplog.text


def test_a_kill_while_pruning_leaves_no_complete_looking_folder(run_copy, monkeypatch):
    root = run_copy / "checkpoints"

    def killed(path, ignore_errors=False):
        (path / "model.safetensors").unlink()  # rmtree got this far
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(root, keep_last=1)
    assert [p.name for p in checkpoint.complete_steps(root)] == ["step_0000006"]
    monkeypatch.undo()
    assert [p.name for p in checkpoint.clean_leftovers(root)] == [".step_0000003.tmp-pruned"]


# 10. `latest` stays inside the run
def test_latest_pointing_outside_the_run_is_refused(run_copy, trained):
    latest = run_copy / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to(trained / "checkpoints" / "step_0000003")
    with pytest.raises(RunRefused, match="trainer.resume: .*latest' points outside its checkpoints folder"):
        resume.resume_source(True, run_copy)
    with pytest.raises(UserError, match="ckpt: .*latest' points outside its checkpoints folder"):
        checkpoint.resolve(run_copy)


# 11. files get the user's umask
def test_checkpoint_files_are_readable_by_others(trained):
    expected = 0o666 & ~safe_io.umask()
    for path in (trained / "checkpoints" / "step_0000006").iterdir():
        assert path.stat().st_mode & 0o777 == expected, path
    assert (trained / "checkpoints" / "step_0000006").stat().st_mode & 0o777 == 0o777 & ~safe_io.umask()
    assert math.isfinite(read_metrics(trained / "metrics.jsonl")[-1]["val_loss"])
