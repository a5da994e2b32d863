import os

import pytest
import torch
from conftest import TINY, assert_resume_is_exact, compose
from safetensors.torch import load_file

from lmtrain.checkpoint import files as checkpoint
from lmtrain.commands import pretrain
from lmtrain.core.errors import UserError

CPU = torch.device("cpu")


def train(run_dir, corpus, *extra):
    cfg = compose(*TINY, f"data.train={corpus}", *extra)
    return pretrain.run(cfg, str(run_dir))


def weights(run_dir):
    return load_file(str(checkpoint.resolve(run_dir) / "model.safetensors"))


# Muon, the weight average and the architecture options of issue 16 resume as exactly as AdamW does
MODERN = ["optimizer=muon", "trainer.ema_decay=0.9", "model.activation=relu2", "model.zero_init_residual=true"]
MODERN += ["model.logit_softcap=30", "model.qk_norm=true", "model.tie_embeddings=false"]


@pytest.mark.parametrize("log_every, options", [(1, []), (2, []), (1, MODERN)], ids=["log1", "log2", "modern"])
def test_resume_equals_uninterrupted_run(tmp_path, corpus, monkeypatch, log_every, options):
    """Also when the checkpoint falls inside a log window (log_every=2, checkpoint at step 3)."""

    def run(run_dir, *extra):
        return train(run_dir, corpus, f"trainer.log_every={log_every}", *options, *extra)

    run(tmp_path / "straight")
    # the process dies after step 4 was logged, with its checkpoint at 3; optimizer and average resume too
    files = ["model.safetensors", "optimizer.safetensors"] + (["ema.safetensors"] if options else [])
    assert_resume_is_exact(run, tmp_path, monkeypatch, 4, "step_0000003", files)


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
    from lmtrain.checkpoint.load import load_model

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
    from lmtrain.checkpoint.load import load_model

    model, _ = load_model(str(tmp_path), torch.device("cpu"))
    saved = load_file(str(source / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name])
    assert torch.equal(model.lm_head.weight, model.token_embedding.weight)


@pytest.mark.parametrize(
    "option",
    [{"activation": "relu2"}, {"zero_init_residual": True}, {"logit_softcap": 3.0}, {"qk_norm": True}],
    ids=lambda option: next(iter(option)),
)
def test_architecture_options_train_and_round_trip_a_checkpoint(tmp_path, option):
    """Each option of issue 16 trains a few steps with Muon, then a saved checkpoint loads into the same model:
    the same config and bit-identical logits."""
    import dataclasses
    import json

    from lmtrain.checkpoint.load import load_model
    from lmtrain.config import OptimizerConfig
    from lmtrain.config.choices import OptimizerName
    from lmtrain.data.tokenizer import byte_tokenizer
    from lmtrain.model.transformer import TransformerConfig, TransformerLM
    from lmtrain.train.optim import build_optimizer

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=257, d_model=32, num_heads=2, num_layers=2, max_seq_len=16, **option)
    model = TransformerLM(config)
    muon = OptimizerConfig(name=OptimizerName.muon, lr=1e-3, weight_decay=0.0, momentum=0.95)
    opt = build_optimizer(model, muon, CPU)
    tokens = torch.randint(0, 257, (4, 16))
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    files = {"model.json": json.dumps(dataclasses.asdict(config)), "tokenizer.json": byte_tokenizer().to_str()}
    trainer_state = {"trainer": {"step": 4, "tokens_seen": 0, "window_steps": 0}, "scheduler": {}}
    saved = checkpoint.save(
        tmp_path,
        4,
        model=model,
        optimizer_state=opt.state_dict(),
        rng={"torch_cpu": torch.get_rng_state()},
        trainer_state=trainer_state,
        files=files,
    )
    loaded, _ = load_model(str(saved), CPU)
    assert loaded.config == config
    model.eval(), loaded.eval()
    assert torch.equal(loaded(tokens), model(tokens))


def test_an_older_model_json_loads_with_the_schema_defaults_for_newer_fields(tmp_path):
    """A model.json written before a field existed lacks it: the field takes the schema's default (what such a
    model was), so the checkpoint loads as the same model; the model itself keeps no defaults of its own."""
    import dataclasses
    import json

    from lmtrain.checkpoint.load import load_model
    from lmtrain.config import ModelConfig
    from lmtrain.data.tokenizer import byte_tokenizer
    from lmtrain.model.transformer import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=257, d_model=32, num_heads=2, num_layers=2, max_seq_len=16)
    model = TransformerLM(config).eval()
    newer = ["norm_position", "rope_scaling", "qkv_bias", "qk_norm", "zero_init_residual", "logit_softcap", "pooling"]
    older = {k: v for k, v in dataclasses.asdict(config).items() if k not in newer}
    files = {"model.json": json.dumps(older), "tokenizer.json": byte_tokenizer().to_str()}
    saved = checkpoint.save(
        tmp_path,
        1,
        model=model,
        optimizer_state={"state": {}, "param_groups": []},
        rng={"torch_cpu": torch.get_rng_state()},
        trainer_state={"trainer": {"step": 1, "tokens_seen": 0, "window_steps": 0}, "scheduler": {}},
        files=files,
    )
    loaded, _ = load_model(str(saved), CPU)
    assert loaded.config == config
    tokens = torch.randint(0, 257, (2, 16))
    assert torch.equal(loaded.eval()(tokens), model(tokens))
    own = {f.name for f in dataclasses.fields(TransformerConfig)} - {f.name for f in dataclasses.fields(ModelConfig)}
    assert own == {"vocab_size", "num_classes", "pooling"}  # every other field and default is the schema's
