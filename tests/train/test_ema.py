"""The weight average (trainer.ema_decay): its formula, that validation sees it, and that checkpoints carry it
into every later use of the model."""

import torch
from conftest import TINY, compose
from safetensors.torch import load_file
from test_trainer import make_trainer

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.load import load_model
from lmtrain.commands import pretrain
from lmtrain.train.ema import EMA, decay_at
from lmtrain.train.sinks import Sinks


def repetitive_batch():
    x = torch.arange(16).repeat(4, 1) % 37
    return [(x, (x + 1) % 37)]


def test_ema_weights_equal_their_formula():
    trainer = make_trainer()
    trainer.ema = EMA(trainer.model, decay=0.7)
    expected = [p.detach().clone().double() for p in trainer.model.parameters()]
    for step in range(1, 22):
        trainer.train_step(repetitive_batch())
        d = min(0.7, (1 + step) / (10 + step))
        assert decay_at(0.7, step) == d
        expected = [
            d * a + (1 - d) * p.detach().double() for a, p in zip(expected, trainer.model.parameters(), strict=True)
        ]
    assert d == 0.7  # the warmup of the decay is over
    for average, want, param in zip(trainer.ema.average, expected, trainer.model.parameters(), strict=True):
        torch.testing.assert_close(average.double(), want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(average, param)


def test_validation_sees_the_average_and_training_its_own_weights():
    trainer = make_trainer()
    trainer.ema = EMA(trainer.model, decay=0.5)
    for _ in range(3):
        trainer.train_step(repetitive_batch())
    own = [p.detach().clone() for p in trainer.model.parameters()]
    seen = []

    def evaluate():
        seen.extend(p.detach().clone() for p in trainer.model.parameters())
        return {"loss": 1.0}

    trainer._validate(evaluate, "loss", False, Sinks([]), type("Bar", (), {"write": print})(), None)
    for a, b in zip(seen, trainer.ema.average, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(trainer.model.parameters(), own, strict=True):
        assert torch.equal(a, b)


def test_checkpoint_holds_the_average_and_loading_it_for_use_takes_it(tmp_path, corpus):
    pretrain.run(compose(*TINY, f"data.train={corpus}", "trainer.ema_decay=0.8"), str(tmp_path))
    latest = checkpoint.resolve(tmp_path)
    average, trained = load_file(str(latest / "ema.safetensors")), load_file(str(latest / "model.safetensors"))
    model, _ = load_model(str(tmp_path), torch.device("cpu"))
    weights = model.state_dict()
    for name, tensor in average.items():
        assert torch.equal(weights[name], tensor), name
        if name in trained:  # a tied embedding is stored once, under the head's name
            assert not torch.equal(trained[name], tensor), name
