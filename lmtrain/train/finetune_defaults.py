"""Finetuning defaults derived from the training set and the model (docs/finetuning.md, "Finetuning defaults").

A finetune config leaves `epochs`, `trainer.micro_batch_size` and `optimizer.lr` null: `derived` fills each
null one from the number of training examples N and the trainable parameters P; a value the user set (on
the command line or in a config file) is kept as given. The rule:

- micro_batch_size: 16, or 32 from 20,000 examples (a large set affords less gradient noise per step);
- epochs: 3 passes, raised so the run sees at least 5,000 examples (at most 20 passes) and lowered so it sees
  at most 30,000 (at least 1 pass); early stopping on the task's main metric ends it sooner;
- lr: 1e-3 × B / 32 × sqrt(min(1, 4M / P)), B the examples per optimizer step: linear in the batch (Goyal et
  al. 2017, "Accurate, Large Minibatch SGD") and, as muP's 1/width for Adam over P ∝ width², 1/sqrt(P)
  above the 4M parameters at which 1e-3 was measured (Yang et al. 2022, "Tensor Programs V"). A LoRA run
  trains few parameters, so it gets a larger rate than a full finetune of the same model.
"""

from __future__ import annotations

import dataclasses
import math

from lmtrain.config.schema import FinetuneConfig

LARGE_SET = 20_000  # examples from which the micro-batch doubles
MIN_SEEN, MAX_SEEN = 5_000, 30_000  # examples a derived run sees, at least and at most
BASE_LR, BASE_BATCH, BASE_PARAMS = 1e-3, 32, 4_000_000


def micro_batch_size(examples: int) -> int:
    """Sequences per forward pass for a training set of `examples`."""
    return 32 if examples >= LARGE_SET else 16


def epochs(examples: int) -> float:
    """Passes over a training set of `examples`: 3, within [MIN_SEEN, MAX_SEEN] examples seen, in [1, 20]."""
    passes = min(max(3.0, MIN_SEEN / examples), MAX_SEEN / examples)
    return round(min(20.0, max(1.0, passes)), 2)


def learning_rate(batch: int, trainable: int) -> float:
    """Peak AdamW learning rate for `batch` examples per optimizer step and `trainable` parameters."""
    lr = BASE_LR * batch / BASE_BATCH * math.sqrt(min(1.0, BASE_PARAMS / trainable))
    return float(f"{lr:.2g}")


def derived(cfg: FinetuneConfig, examples: int, trainable: int, world_size: int) -> tuple[FinetuneConfig, str]:
    """`cfg` with its null epochs, trainer.micro_batch_size and optimizer.lr filled in for `examples`
    training examples and `trainable` parameters, and the log line naming what was derived ("" if nothing)."""
    chosen: dict[str, float] = {}
    t, o = cfg.trainer, cfg.optimizer
    if t.micro_batch_size is None:
        chosen["micro_batch_size"] = micro_batch_size(examples)
        t = dataclasses.replace(t, micro_batch_size=chosen["micro_batch_size"])
    if cfg.epochs is None:
        chosen["epochs"] = epochs(examples)
    if o.lr is None:
        chosen["lr"] = learning_rate(t.micro_batch_size * cfg.grad_accum.steps * world_size, trainable)
        o = dataclasses.replace(o, lr=chosen["lr"])
    resolved = dataclasses.replace(cfg, trainer=t, optimizer=o, epochs=chosen.get("epochs", cfg.epochs))
    if not chosen:
        return resolved, ""
    values = ", ".join(f"{k}={v:g}" for k, v in chosen.items())
    line = f"defaults derived from {examples:,} training examples and {trainable:,} trainable parameters: {values}"
    return resolved, line + " (set any of them to override)"
