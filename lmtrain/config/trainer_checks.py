"""Checks of the trainer keys that pick a mode rather than a number: the micro-batch (a size or auto), the
trackers asked for, and benchmark scoring during training."""

from __future__ import annotations

import importlib.util
from typing import Any

from lmtrain.config.schema import FinetuneConfig, PretrainConfig, TrainerConfig


def check_trainer(cfg: PretrainConfig | FinetuneConfig, errors: list[str]) -> None:
    _check_micro_batch(cfg, errors)
    _check_loggers(cfg.trainer, errors)
    _check_eval_suite(cfg.trainer, errors)


def _check_micro_batch(cfg: PretrainConfig | FinetuneConfig, errors: list[str]) -> None:
    size = cfg.trainer.micro_batch_size
    if size is None and isinstance(cfg, FinetuneConfig):
        return  # derived from the training set (lmtrain.train.finetune_defaults)
    if size == "auto":
        if isinstance(cfg, FinetuneConfig) or cfg.grad_accum.mode != "global_batch":
            errors.append(
                "trainer.micro_batch_size=auto: needs lmtrain pretrain with grad_accum=global_batch (the global batch "
                "in tokens stays fixed while the micro-batch is chosen); give a number otherwise"
            )
    elif isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        errors.append(f"trainer.micro_batch_size: must be a number > 0 or auto, got {size!r}")


def _check_loggers(t: TrainerConfig, errors: list[str]) -> None:
    """A tracker asked for must be installed: caught here, before any training, with the command to fix it."""
    for name, package in (("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if name in t.loggers and importlib.util.find_spec(package) is None:
            errors.append(f"trainer.loggers: {name} needs the {package} package: pip install 'lmtrain[{name}]'")


def _check_eval_suite(t: Any, errors: list[str]) -> None:
    for key in ("eval_suite_every", "eval_suite_limit"):
        if getattr(t, key) is not None and getattr(t, key) <= 0:
            errors.append(f"trainer.{key}: must be > 0 or null, got {getattr(t, key)}")
    if t.eval_suite_num_fewshot is not None and t.eval_suite_num_fewshot < 0:
        errors.append(f"trainer.eval_suite_num_fewshot: must be >= 0, got {t.eval_suite_num_fewshot}")
    if t.eval_suite_metric is None:
        return
    if t.eval_suite is None:
        errors.append("trainer.eval_suite_metric: needs trainer.eval_suite (a task or group YAML)")
    elif not t.eval_suite_metric.startswith("suite_"):
        errors.append(f"trainer.eval_suite_metric: '{t.eval_suite_metric}' is not a suite metric (suite_core, ...)")
    elif t.eval_suite_every is not None:
        errors.append("trainer.eval_suite_every: the main metric is needed at every validation; leave it null")
