"""A full disk at each write point is one line (`cannot write '<file>': No space left on device`) and leaves the
last good state whole. ENOSPC is injected where each writer meets it: safetensors' save_file raises its own
SafetensorError ("No space left on device (os error 28)"), Python's writes an OSError."""

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import TINY, compose
from safetensors import SafetensorError

from lmtrain.checkpoint import export as export_format
from lmtrain.checkpoint import files as checkpoint
from lmtrain.commands import export, pretrain
from lmtrain.config import ExportConfig
from lmtrain.config.compose import check
from lmtrain.core.errors import UserError
from lmtrain.hf import save as hf_save


def full_for(suffix: str, real):
    """`real` save_file, failing as safetensors does on a full disk for files whose name ends with `suffix`."""

    def save_file(tensors, path, *args, **kwargs):
        if str(path).endswith(suffix):
            raise SafetensorError("Error while serializing: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    return save_file


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    pretrain.run(compose(*TINY, f"data.train={corpus}", "trainer.keep_last=0"), str(run_dir))
    return run_dir


def test_checkpoint_write_through_safetensors(run, corpus, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    monkeypatch.setattr(checkpoint, "save_file", full_for("optimizer.safetensors", checkpoint.save_file))
    cfg = compose(*TINY, f"data.train={corpus}", "trainer.resume=true", "trainer.max_steps=9")
    with pytest.raises(UserError, match=r"cannot write '.*step_0000009/optimizer.safetensors': No space left on dev"):
        pretrain.run(cfg, str(copy))
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before
    assert checkpoint.newest_valid(copy / "checkpoints")[0].name == "step_0000006"


@pytest.mark.parametrize("fmt, module", [("lmtrain", export_format), ("hf", hf_save)])
def test_export_write_through_safetensors(run, tmp_path, monkeypatch, fmt, module):
    out = tmp_path / "export"
    monkeypatch.setattr(module, "save_file", full_for(".safetensors", module.save_file))
    cfg = check("export", ExportConfig, [f"ckpt={run}", f"out={out}", f"format={fmt}", "device=cpu"])
    with pytest.raises(UserError, match=rf"cannot write '{out}(/model.safetensors)?': No space left on device"):
        export.run(cfg, str(tmp_path))
    assert not out.exists() and not list(tmp_path.glob(".export.tmp-*"))  # nothing half-written stays


def test_export_removes_what_a_killed_export_left(run, tmp_path):
    out = tmp_path / "export"
    dead = tmp_path / f".export.tmp-{2**22 + 7}-abc"  # no process has this id (above the default pid_max)
    live = tmp_path / f".export.tmp-{os.getpid()}-abc"  # a live writer's: left alone
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    export.run(check("export", ExportConfig, [f"ckpt={run}", f"out={out}", "device=cpu"]), str(tmp_path))
    assert (out / "export.json").is_file() and not dead.exists() and live.exists()


def test_abandoned_continuations_do_not_pile_up(run, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(run / "checkpoints", root, symlinks=True)
    old = root / ".abandoned-step_0000009"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"an earlier abandoned continuation")
    time.sleep(0.01)
    moved = checkpoint.set_aside_after(root, 3)
    assert [p.name for p in moved] == [".abandoned-step_0000006"]
    assert sorted(p.name for p in root.glob(".abandoned-*")) == [".abandoned-step_0000006"]
    assert json.loads((moved[0] / "trainer_state.json").read_text())["trainer"]["step"] == 6


def test_result_and_metrics_name_the_file(tmp_path, monkeypatch):
    from lmtrain.core import safe_io
    from lmtrain.train.sweep import write_result

    write_result(tmp_path, "completed", {"objective": 1.0}, [])
    before = (tmp_path / "result.json").read_text()
    real_open = open

    def full_open(path, *args, **kwargs):
        if Path(path).name.startswith(".result.json.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safe_io, "open", full_open, raising=False)
    with pytest.raises(UserError, match="cannot write '.*result.json': No space left on device"):
        write_result(tmp_path, "failed", {}, [])
    assert (tmp_path / "result.json").read_text() == before


class FullFile:
    """A file on a full disk: every write raises ENOSPC."""

    def __init__(self, path):
        self.name = str(path)

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_prepare_shards_and_tokenizer_name_the_file(tmp_path, monkeypatch):
    import numpy as np

    from lmtrain.core import safe_io
    from lmtrain.data import shards
    from lmtrain.train.run_dir import take_over

    monkeypatch.setattr(shards, "open", lambda path, mode: FullFile(path), raising=False)
    writer = shards.ShardWriter(tmp_path, "train", 1000, np.dtype(np.uint16))
    with pytest.raises(UserError, match=r"cannot write '.*\.bin\.partial': No space left on device"):
        writer.add(np.arange(10), 0, 0, True)
    (tmp_path / "tokenizer.json").write_text("the run's tokenizer")
    monkeypatch.setattr(safe_io, "open", lambda path, mode: FullFile(path), raising=False)
    with pytest.raises(UserError, match=r"cannot write '.*tokenizer.json': No space left on device"):
        take_over(tmp_path, "another tokenizer")
    assert (tmp_path / "tokenizer.json").read_text() == "the run's tokenizer"
