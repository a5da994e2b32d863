from functools import partial

import numpy as np
import torch

from lmtrain.config import OptimizerConfig, SchedulerConfig
from lmtrain.data.tokens import WindowSampler
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train.losses import cross_entropy
from lmtrain.train.optim import build_optimizer
from lmtrain.train.schedules import build_scheduler
from lmtrain.train.trainer import Cadence, Trainer

CPU = torch.device("cpu")


def make_trainer(lr: float = 1e-3) -> Trainer:
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=37, d_model=32, num_heads=2, num_layers=2, max_seq_len=16))
    opt = build_optimizer(model, OptimizerConfig(lr=lr, momentum=0.0), CPU)
    sched = build_scheduler(opt, SchedulerConfig(warmup_steps=2, min_lr=lr / 10), lr, 30)
    return Trainer(model, opt, sched, partial(cross_entropy, label_smoothing=0.05), device=CPU, grad_clip=1.0)


def assert_same_weights(a: Trainer, b: Trainer, rtol: float = 1e-5):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        diff = (p - q).norm() / q.norm()
        assert diff <= rtol, f"{name}: relative difference {diff:.2e}"


def batches_of(x, y, size):
    return list(zip(x.split(size), y.split(size), strict=True))


def test_accumulation_equals_large_batch():
    rng = torch.Generator().manual_seed(0)
    big, accum = make_trainer(), make_trainer()
    for _ in range(5):
        x = torch.randint(0, 37, (16, 16), generator=rng)
        y = torch.randint(0, 37, (16, 16), generator=rng)
        big.train_step(batches_of(x, y, 16))
        accum.train_step(batches_of(x, y, 4))
    assert_same_weights(big, accum)


def test_accumulation_is_exact_with_uneven_target_counts():
    """Micro-batches with very different numbers of target tokens: normalizing by the step's total count
    (not averaging per micro-batch) still gives the large-batch update."""
    rng = torch.Generator().manual_seed(1)
    big, accum = make_trainer(), make_trainer()
    for _ in range(5):
        x = torch.randint(0, 37, (16, 16), generator=rng)
        y = torch.randint(0, 37, (16, 16), generator=rng)
        y[:4, 2:] = -100  # micro-batch 1: 8 targets; the others: 64 each
        y[4:8, 10:] = -100  # micro-batch 2: 40 targets
        big.train_step(batches_of(x, y, 16))
        accum.train_step(batches_of(x, y, 4))
    assert_same_weights(big, accum)


def test_per_micro_batch_mean_would_differ():
    """Guards the test above: averaging per-micro-batch means is measurably different."""
    rng = torch.Generator().manual_seed(1)
    x = torch.randint(0, 37, (16, 16), generator=rng)
    y = torch.randint(0, 37, (16, 16), generator=rng)
    y[:4, 2:] = -100
    trainer = make_trainer()
    exact = torch.autograd.grad(
        cross_entropy(trainer.model(x), y)[0] / (y != -100).sum(), trainer.model.token_embedding.weight
    )[0]
    naive = sum(
        torch.autograd.grad(
            cross_entropy(trainer.model(xb), yb)[0] / (yb != -100).sum() / 4,
            trainer.model.token_embedding.weight,
        )[0]
        for xb, yb in batches_of(x, y, 4)
    )
    assert (exact - naive).norm() / exact.norm() > 1e-3


def test_loss_goes_down_on_repetitive_data():
    pattern = np.tile(np.arange(37, dtype=np.uint16), 200)
    sampler = WindowSampler(pattern, 16, seed=0)
    trainer = make_trainer(lr=1e-2)
    validation = sampler.next_step(2, 8)
    before = trainer.evaluate_loss(validation)
    for _ in range(20):
        trainer.train_step(sampler.next_step(1, 8))
    after = trainer.evaluate_loss(validation)
    assert after < before * 0.5, (before, after)
    assert trainer.state.step == 20 and trainer.state.tokens_seen == 20 * 8 * 16


def test_early_stopping_stops_at_the_validation_that_runs_out_of_patience():
    """Validation every 2 steps: the best comes at step 4, then 6 and 8 bring no better value, so with a
    patience of 2 the run ends at step 8, with a checkpoint there, instead of running to step 20."""
    trainer = make_trainer()
    trainer.early_stopping_patience = 2
    scores = iter([9.0, 5.0, 3.0, 3.0, 4.0, 1.0])  # steps 0, 2, 4, 6, 8, (10)
    x = torch.arange(16).repeat(2, 1)
    saved, records = [], []

    def fit():
        trainer.fit(
            lambda: [(x, x)],
            lambda: {"loss": next(scores)},
            cadence=Cadence(max_steps=20, eval_every=2, log_every=1, checkpoint_every=100),
            sink=Collect(records),
            save_checkpoint=lambda: saved.append(trainer.state.step),
            progress_bar=False,
        )

    fit()
    assert trainer.state.step == 8 and saved == [8]
    assert trainer.state.best_metric == 3.0 and trainer.state.validations_since_best == 2
    assert [r["step"] for split, r in records if split == "val"] == [0, 2, 4, 6, 8]
    assert all("val_loss" in r for split, r in records if split == "val")
    assert all("loss" in r and "val_loss" not in r for split, r in records if split == "train")
    # a resumed run that already ran out of patience trains no further
    fit()
    assert trainer.state.step == 8


class Collect:
    """A sink that keeps (split, record) pairs."""

    def __init__(self, records: list):
        self.records = records

    def write(self, record: dict, split: str) -> None:
        self.records.append((split, record))

    def summary(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def test_validation_and_checkpoint_time_stay_out_of_tokens_per_s():
    """Validating at steps 0 and 1 sleeps 0.5 s each; the window logged at step 2 counts only its two steps."""
    import time

    trainer = make_trainer()
    x = torch.arange(16).repeat(2, 1)
    records: list[tuple[str, dict]] = []

    def slow_validation() -> dict:
        time.sleep(0.5)
        return {"loss": 1.0}

    started = time.perf_counter()
    trainer.fit(
        lambda: [(x, x)],
        slow_validation,
        cadence=Cadence(max_steps=2, eval_every=1, log_every=2, checkpoint_every=1),
        sink=Collect(records),
        save_checkpoint=lambda: time.sleep(0.5) if trainer.state.step == 1 else None,
        progress_bar=False,
    )
    total = time.perf_counter() - started
    window_seconds = x.numel() * 2 / next(r for _, r in records if "tokens_per_s" in r)["tokens_per_s"]
    assert window_seconds < total - 1.4  # the three sleeps before the log record are not in it


def test_mfu_is_never_above_one_on_cpu():
    from lmtrain.core import devices

    # a rate no CPU peak measurement reaches: reported as unknown, not as a utilisation above 1
    assert devices.mfu(1e30, devices.cpu_peak("fp32"), CPU, "fp32") is None
    peak = devices.cpu_peak("fp32")
    assert devices.mfu(peak / 2, peak, CPU, "fp32") == 0.5
    # a stale low peak is raised to this process's measurement before dividing
    assert devices.mfu(peak / 2, peak / 4, CPU, "fp32") == 0.5
