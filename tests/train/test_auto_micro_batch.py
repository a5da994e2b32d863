"""trainer.micro_batch_size=auto: an out-of-memory step is retried in halves from the same data, and the update
is that of the configured global batch."""

import pytest
import torch
from conftest import TINY, compose
from safetensors.torch import load_file

from lmtrain.analysis import costs
from lmtrain.checkpoint import files as checkpoint
from lmtrain.commands import pretrain
from lmtrain.config import ConfigError
from lmtrain.train.micro_batch import split_batches
from lmtrain.train.trainer import Trainer

GLOBAL = [*TINY, "grad_accum=global_batch", "grad_accum.global_batch_tokens=512", "trainer.max_steps=4"]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.resolve(run_dir) / "model.safetensors"))


def test_an_out_of_memory_micro_batch_of_16_settles_on_8_by_2_with_the_same_update(tmp_path, corpus, monkeypatch):
    real_loss = Trainer.loss

    def sixteen_does_not_fit(self, batch):
        if len(batch[1]) == 16:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_loss(self, batch)

    monkeypatch.setattr(costs, "fitting_micro_batch", lambda *args: 16)
    monkeypatch.setattr(Trainer, "loss", sixteen_does_not_fit)
    auto = pretrain.run(compose(*GLOBAL, f"data.train={corpus}", "trainer.micro_batch_size=auto"), str(tmp_path / "a"))
    assert (auto["micro_batch_size"], auto["accumulation_steps"]) == (8, 2)
    monkeypatch.setattr(Trainer, "loss", real_loss)
    pretrain.run(compose(*GLOBAL, f"data.train={corpus}", "trainer.micro_batch_size=8"), str(tmp_path / "b"))
    pretrain.run(compose(*GLOBAL, f"data.train={corpus}", "trainer.micro_batch_size=16"), str(tmp_path / "c"))
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    for key in a:
        assert torch.equal(a[key], b[key]), key  # the same rows in the same micro-batches: bitwise
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=1e-5)  # one batch of 16: the same update

    # a resumed auto run keeps the micro-batch it chose and the split it settled on
    monkeypatch.setattr(costs, "fitting_micro_batch", lambda *args: pytest.fail("estimated again on resume"))
    resumed = pretrain.run(
        compose(
            *GLOBAL,
            f"data.train={corpus}",
            "trainer.micro_batch_size=auto",
            "trainer.max_steps=5",
            "trainer.resume=true",
        ),
        str(tmp_path / "a"),
    )
    assert (resumed["micro_batch_size"], resumed["accumulation_steps"]) == (8, 2)


def test_split_keeps_every_row_once_in_order():
    x = torch.arange(24).view(6, 4)
    batches = [({"tokens": x, "document_ids": x + 100}, x + 1)]
    parts = split_batches(batches, 4)
    assert [len(y) for _, y in parts] == [2, 2, 1, 1]
    assert torch.equal(torch.cat([inputs["tokens"] for inputs, _ in parts]), x)
    assert torch.equal(torch.cat([y for _, y in parts]), x + 1)


def test_auto_needs_a_global_batch_in_tokens():
    with pytest.raises(ConfigError, match="trainer.micro_batch_size=auto: needs lmtrain pretrain with grad_accum=gl"):
        compose(*TINY, "trainer.micro_batch_size=auto")
    with pytest.raises(ConfigError, match="trainer.micro_batch_size: must be a number > 0 or auto, got 'big'"):
        compose(*TINY, "trainer.micro_batch_size=big")


def test_the_estimate_is_a_power_of_two_that_divides_the_global_batch():
    from lmtrain.model.transformer import TransformerConfig, TransformerLM

    cfg = compose(*GLOBAL)
    model = TransformerLM(TransformerConfig(vocab_size=64, **{**vars(cfg.model)}))
    roomy = costs.fitting_micro_batch(model, 32, cfg, 10**12, 512, 1)
    assert roomy == 16  # 16 × 32 tokens is the whole global batch
    memory = costs.memory_estimate(
        costs.ModelShape.of(model.config),
        total_params=model.num_parameters(),
        trainable_params=model.num_parameters(),
        linear_weights=0,
        micro_batch=1,
        seq_len=32,
        precision="fp32",
        optimizer_bytes=(8, 4),
    )
    tight = memory["weights"] + memory["gradients"] + memory["optimizer"] + 5 * memory["activations"]
    assert costs.fitting_micro_batch(model, 32, cfg, tight, 512, 1) == 4


def test_plan_shows_the_micro_batch_auto_would_choose():
    from lmtrain.cli import check
    from lmtrain.commands.plan import build
    from lmtrain.config import PretrainConfig

    cfg = check(
        "pretrain", PretrainConfig, [*GLOBAL, "trainer.micro_batch_size=auto", "grad_accum.global_batch_tokens=2048"]
    )
    plan = build("pretrain", cfg, "cpu")
    assert plan["tokens"]["micro_batch_size"] == 64  # 64 × 32 tokens: the whole global batch fits at once
