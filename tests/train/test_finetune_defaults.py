"""The finetuning defaults derived from the training set's size and the trainable parameters: the rule's
values, and a value the user set is kept as given."""

import pytest

from lmtrain.cli import check
from lmtrain.config import FinetuneConfig
from lmtrain.train import finetune_defaults as fd

BASE = ["init_from=x", "data.train=x.jsonl"]


def test_the_rule_on_small_and_large_sets_and_models():
    assert [fd.micro_batch_size(n) for n in (100, 2_400, 19_999, 20_000, 28_000)] == [16, 16, 16, 32, 32]
    # 3 passes; at least 5,000 examples seen (at most 20 passes), at most 30,000 (at least 1 pass)
    assert [fd.epochs(n) for n in (100, 1_000, 2_400, 10_000, 15_000, 28_000, 400_000)] == [20, 5, 3, 3, 2, 1.07, 1]
    assert fd.learning_rate(32, 3_300_000) == 1e-3  # the tuned translation rate of a 3.3M-parameter model
    assert fd.learning_rate(16, 3_300_000) == 5e-4  # linear in the batch
    assert fd.learning_rate(16, 400_000) == 5e-4  # no higher below 4M trainable parameters
    assert fd.learning_rate(32, 400_000_000) == 1e-4  # 1/sqrt(P) above: 100 times the parameters, a tenth


def test_null_values_are_derived_and_named_in_one_line():
    cfg = check("finetune", FinetuneConfig, BASE)
    assert cfg.epochs is None and cfg.optimizer.lr is None and cfg.trainer.micro_batch_size is None
    assert cfg.trainer.max_steps is None and cfg.trainer.eval_every is None  # no cap; evals_per_epoch decides
    resolved, line = fd.derived(cfg, 28_000, 3_344_448, world_size=1)
    assert (resolved.epochs, resolved.trainer.micro_batch_size, resolved.optimizer.lr) == (1.07, 32, 1e-3)
    assert line == (
        "defaults derived from 28,000 training examples and 3,344,448 trainable parameters: "
        "micro_batch_size=32, epochs=1.07, lr=0.001 (set any of them to override)"
    )
    # the rate follows the examples per optimizer step: accumulation and processes count
    accumulated = check("finetune", FinetuneConfig, [*BASE, "grad_accum.steps=2"])
    assert fd.derived(accumulated, 28_000, 3_344_448, world_size=2)[0].optimizer.lr == 4e-3


@pytest.mark.parametrize(
    ("given", "derived"),
    [
        (["trainer.micro_batch_size=8", "optimizer.lr=3e-4", "epochs=2", "trainer.max_steps=100"], ""),
        (["trainer.micro_batch_size=64"], "epochs=1.07, lr=0.002"),  # the rate follows the batch given
        (["optimizer.lr=2e-2", "trainer.max_steps=7"], "micro_batch_size=32, epochs=1.07 "),
    ],
)
def test_a_value_set_is_never_overridden(given, derived):
    cfg = check("finetune", FinetuneConfig, [*BASE, *given])
    resolved, line = fd.derived(cfg, 28_000, 3_344_448, world_size=1)
    for override in given:
        key, value = override.split("=")
        section, _, name = key.rpartition(".")
        holder = getattr(resolved, section) if section else resolved
        assert getattr(holder, name) == type(getattr(holder, name))(float(value))
    assert derived in line if derived else line == ""
