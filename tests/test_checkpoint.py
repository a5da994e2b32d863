import os

import pytest
import torch
from conftest import TINY, compose
from safetensors.torch import load_file

from lmtrain import checkpoint
from lmtrain.commands import pretrain
from lmtrain.errors import UserError
from lmtrain.run_log import read_metrics
from lmtrain.trainer import Trainer


def train(run_dir, corpus, *extra):
    cfg = compose(*TINY, f"data.train={corpus}", *extra)
    return pretrain.run(cfg, str(run_dir))


def weights(run_dir):
    return load_file(str(checkpoint.resolve(run_dir) / "model.safetensors"))


@pytest.mark.parametrize("log_every", [1, 2])
def test_resume_equals_uninterrupted_run(tmp_path, corpus, monkeypatch, log_every):
    """Also when the checkpoint falls inside a log window (log_every=2, checkpoint at step 3)."""
    train(tmp_path / "straight", corpus, f"trainer.log_every={log_every}")

    real_step = Trainer.train_step

    def crash_after_step_4(self, batches):
        if self.state.step == 4:
            raise KeyboardInterrupt  # the process dies after step 4 was logged, checkpoint at 3
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", corpus, f"trainer.log_every={log_every}")
    assert checkpoint.resolve(tmp_path / "resumed").name == "step_0000003"
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(tmp_path / "resumed", corpus, f"trainer.log_every={log_every}", "trainer.resume=true")

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the same records (losses, lr, grad norms, validation), only the measured speed differs
    assert without_speed(tmp_path / "straight") == without_speed(tmp_path / "resumed")


def without_speed(run_dir):
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path, corpus):
    train(tmp_path, corpus)
    with pytest.raises(UserError, match="trainer.resume: run dir .* already holds checkpoints"):
        train(tmp_path, corpus)


def test_resume_from_a_path_and_model_mismatch(tmp_path, corpus):
    train(tmp_path / "a", corpus)
    train(tmp_path / "b", corpus, f"trainer.resume={tmp_path / 'a'}", "trainer.max_steps=9")
    assert checkpoint.resolve(tmp_path / "b").name == "step_0000009"
    with pytest.raises(
        UserError, match="the model shape in .* differs from this run's config: d_model 64 there, 32 here"
    ):
        train(tmp_path / "c", corpus, f"trainer.resume={tmp_path / 'a'}", "model.d_model=32")


def test_half_written_checkpoint_is_never_latest(tmp_path, corpus, monkeypatch):
    train(tmp_path, corpus, "trainer.keep_last=0")
    root = tmp_path / "checkpoints"
    assert checkpoint.resolve(tmp_path).name == "step_0000006"

    # a save that dies mid-write leaves nothing behind and `latest` unchanged
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError):
        train(tmp_path, corpus, "trainer.resume=true", "trainer.max_steps=9")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003", "step_0000006"]

    # a process killed outright can leave a staging folder, or a folder without its completion marker
    staging = root / ".step_0000009.tmp-123"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    partial = root / "step_0000012"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.resolve(tmp_path).name == "step_0000006"
    os.remove(root / "latest")  # even without the link, the newest complete one wins
    assert checkpoint.resolve(tmp_path).name == "step_0000006"


def test_resuming_an_older_checkpoint_sets_newer_ones_aside(tmp_path, corpus):
    train(tmp_path, corpus, "trainer.keep_last=0")
    older = tmp_path / "checkpoints" / "step_0000003"
    train(tmp_path, corpus, f"trainer.resume={older}", "trainer.max_steps=5", "trainer.keep_last=1")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".abandoned-step_0000006", "latest", "step_0000005"]
    assert checkpoint.resolve(tmp_path).name == "step_0000005"


@pytest.mark.parametrize("damage", ["truncated weights", "missing model.json"])
def test_unreadable_checkpoint_is_one_line(tmp_path, corpus, damage):
    train(tmp_path, corpus)
    source = checkpoint.resolve(tmp_path)
    if damage == "truncated weights":
        (source / "model.safetensors").write_bytes(b"\x00\x01")
    else:
        (source / "model.json").unlink()
    from lmtrain.pretrained import load_model

    said = (
        "is damaged .shorter than a safetensors header" if damage == "truncated weights" else "model.json' is missing"
    )
    with pytest.raises(UserError, match=f"ckpt: .*{said}"):
        load_model(str(tmp_path), torch.device("cpu"))
    with pytest.raises(UserError, match=f"trainer.resume: .*{said}"):
        train(tmp_path / "other", corpus, f"trainer.resume={source}")


def test_keep_last_prunes(tmp_path, corpus):
    train(tmp_path, corpus, "trainer.checkpoint_every=1", "trainer.keep_last=2")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000005", "step_0000006"]


def test_checkpoint_round_trip_is_bitwise_and_needs_no_pickle(tmp_path, corpus):
    train(tmp_path, corpus)
    source = checkpoint.resolve(tmp_path)
    assert sorted(p.name for p in source.iterdir()) == [
        "config.yaml",
        "model.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "tokenizer.json",
        "trainer_state.json",
    ]
    from lmtrain.pretrained import load_model

    model, _ = load_model(str(tmp_path), torch.device("cpu"))
    saved = load_file(str(source / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name])
    assert torch.equal(model.lm_head.weight, model.token_embedding.weight)
