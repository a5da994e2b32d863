"""Assembly: builds the Trainer of a pretrain or finetune run from its config (placement, optimizer, schedule,
loss, teacher) and runs it in its run dir, resuming first when asked; returns the run's summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.load import load_model, load_side_files
from lmtrain.config import FinetuneConfig, LossConfig, PretrainConfig, SchedulerConfig, TrainerConfig
from lmtrain.core import devices, distributed
from lmtrain.core.distributed import Placement
from lmtrain.core.errors import Diverged, UserError
from lmtrain.model.transformer import TransformerLM
from lmtrain.train.checkpointer import Checkpointer
from lmtrain.train.ema import EMA
from lmtrain.train.losses import cross_entropy, distillation
from lmtrain.train.optim import build_optimizer, build_scheduler
from lmtrain.train.resume import Sampler, restore
from lmtrain.train.run_dir import open_metrics, take_over
from lmtrain.train.trainer import Cadence, Trainer

log = logging.getLogger("lmtrain")


def build_trainer(
    model: TransformerLM,
    cfg,
    placement: Placement,
    max_steps: int,
    *,
    tokenizer_json: str,
    class_weights: torch.Tensor | None = None,
) -> Trainer:
    """The model placed (single, DDP or FSDP), then optimizer, schedule and loss (and, for loss=distill, the
    teacher) from the shared config groups (cfg: PretrainConfig | FinetuneConfig)."""
    o, s, t, lo = cfg.optimizer, cfg.scheduler, cfg.trainer, cfg.loss
    device = placement.device
    teacher = load_teacher(lo.teacher, model, tokenizer_json, device) if lo.name == "distill" else None
    model.activation_checkpointing = t.activation_checkpointing
    parallel = distributed.wrap(model, placement, t.precision)
    optimizer = build_optimizer(
        model,
        name=o.name,
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
        momentum=o.momentum,
        device=device,
        muon_lr=o.muon_lr,
        muon_adjust_lr_fn=o.muon_adjust_lr_fn,
        muon_dtype=o.muon_dtype,
    )
    scheduler = _schedule(optimizer, o.lr, s, max_steps)
    ema = EMA(model, t.ema_decay) if t.ema_decay is not None else None
    return Trainer(
        model,
        optimizer,
        scheduler,
        _loss_fn(lo, distill=teacher is not None, class_weights=class_weights),
        device=device,
        precision=t.precision,
        grad_clip=o.grad_clip,
        ignore_index=lo.ignore_index,
        compile=t.compile,
        compile_eval=t.compile_eval,
        peak_flops=devices.peak_flops(device, t.precision),
        teacher=teacher,
        placement=placement,
        parallel=parallel,
        on_nonfinite=t.on_nonfinite,
        ema=ema,
        early_stopping_patience=t.early_stopping_patience,
    )


def run_files(cfg: PretrainConfig | FinetuneConfig, model: TransformerLM, tokenizer_json: str) -> dict[str, str]:
    """The text files every checkpoint of the run carries: its config, the model's shape, the tokenizer, and
    init_from's tokenizer/generation files (a Hugging Face model's)."""
    return {
        "config.yaml": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        "model.json": json.dumps(dataclasses.asdict(model.config), indent=2),
        "tokenizer.json": tokenizer_json,
        **(load_side_files(cfg.init_from, "init_from") if cfg.init_from else {}),
    }


def _schedule(optimizer: torch.optim.Optimizer, lr: float, s: SchedulerConfig, max_steps: int):
    """The LR schedule; a warmup longer than the run (`trainer.max_steps=5`, a quick try) is cut to fit it."""
    warmup = s.warmup_steps
    if warmup > max_steps:
        log.warning("scheduler.warmup_steps: %d is longer than the run; cut to its %d steps", warmup, max_steps)
        warmup = max_steps
    return build_scheduler(
        optimizer,
        name=s.name,
        lr=lr,
        warmup_steps=warmup,
        max_steps=max_steps,
        min_lr=s.min_lr,
        decay_fraction=s.decay_fraction,
    )


def _loss_fn(lo: LossConfig, distill: bool, class_weights: torch.Tensor | None) -> Callable:
    """The training loss the loss group names (validation always uses plain cross-entropy)."""
    common: dict[str, Any] = dict(
        label_smoothing=lo.label_smoothing, z_loss=lo.z_loss, ignore_index=lo.ignore_index, class_weights=class_weights
    )
    if distill:
        return partial(distillation, temperature=lo.temperature, alpha=lo.alpha, kl=lo.kl, **common)
    return partial(cross_entropy, **common)


def load_teacher(path: str, student: TransformerLM, tokenizer_json: str, device: torch.device) -> TransformerLM:
    """The distillation teacher: frozen, in eval mode, checked to speak the student's vocabulary."""
    teacher, tokenizer = load_model(path, device, key="loss.teacher")
    if teacher.config.vocab_size != student.config.vocab_size or tokenizer.to_str() != tokenizer_json:
        raise UserError(
            f"loss.teacher: its tokenizer ({teacher.config.vocab_size} entries) is not the student's "
            f"({student.config.vocab_size} entries); distill from a model trained with the same tokenizer"
        )
    if teacher.config.num_classes != student.config.num_classes:
        raise UserError(
            f"loss.teacher: it predicts {teacher.config.num_classes} classes, the student {student.config.num_classes}"
            " (a classification student needs a teacher finetuned on the same labels)"
        )
    if teacher.config.max_seq_len < student.config.max_seq_len:
        raise UserError(
            f"loss.teacher: its context ({teacher.config.max_seq_len}) is shorter than the student's "
            f"({student.config.max_seq_len})"
        )
    teacher.eval().requires_grad_(False)
    log.info("distilling from %s (%s parameters)", path, f"{teacher.num_parameters():,}")
    return teacher


def train(
    trainer: Trainer,
    sampler: Sampler,
    next_step: Callable[[], list],
    evaluate: Callable[[], dict[str, float]],
    *,
    run_dir: Path,
    files: dict[str, str],
    source: Path | None,
    settings: TrainerConfig,
    max_steps: int,
    eval_every: int,
    started: float,
    main_metric: str = "loss",
    higher_is_better: bool = False,
    keep_best: bool = False,
    data_counts: dict[str, int] | None = None,
    accounting: Callable[[], dict] | None = None,
) -> dict:
    """Resume if asked, run `trainer.fit` with metrics and checkpoints in `run_dir`, and return the run's
    summary (the `result.json` body) with the `objective` Hydra sweepers minimise. `data_counts` (records
    skipped, ...) open a fresh run's metrics.jsonl as a step-0 record."""
    main = trainer.placement.is_main
    if source is not None:
        restore(source, trainer, sampler, files, run_dir)
    if main:
        take_over(run_dir, files["tokenizer.json"])
    resume_step = trainer.state.step if source is not None else None
    metrics = open_metrics(run_dir, resume_step, settings.tensorboard, main)
    if data_counts and source is None:
        metrics.write({"step": 0, **data_counts})
    checkpointer = Checkpointer(run_dir, trainer, sampler, files, settings.keep_last)
    state = trainer.state
    start_step, start_tokens, start_seconds = state.step, state.tokens_seen, state.train_seconds
    try:
        trainer.fit(
            next_step,
            evaluate,
            cadence=Cadence(max_steps, eval_every, settings.log_every, settings.checkpoint_every),
            write_metrics=metrics.write,
            save_checkpoint=checkpointer.save,
            save_best=checkpointer.save_best if keep_best else None,
            main_metric=main_metric,
            higher_is_better=higher_is_better,
            progress_bar=settings.progress_bar,
            accounting=accounting,
        )
    except Diverged as err:
        last = checkpoint.complete_steps(run_dir / "checkpoints")
        kept = f"{last[-1]} is the last finite checkpoint and stays latest" if last else "no checkpoint was written"
        raise Diverged(
            f"{err}; {kept}. Lower optimizer.lr, set optimizer.grad_clip, or pass trainer.on_nonfinite=skip"
        ) from None
    finally:
        metrics.close()
    start = (start_step, start_tokens, start_seconds)
    return _summary(trainer, start, started, run_dir, main_metric, higher_is_better, keep_best)


def _summary(
    trainer: Trainer,
    start: tuple[int, int, float],
    started: float,
    run_dir: Path,
    main_metric: str,
    higher_is_better: bool,
    keep_best: bool,
) -> dict:
    """The run's result.json body (and its log line): best and final validation, throughput, MFU, checkpoints.
    `start`: step, tokens seen and training seconds where this process began (after a resume, not 0)."""
    state = trainer.state
    start_step, start_tokens, start_seconds = start
    tokens, seconds = state.tokens_seen - start_tokens, state.train_seconds - start_seconds
    tokens_per_s = tokens / seconds if tokens and seconds > 0 else None
    best = state.best_metric if state.best_metric is not None else float("nan")
    final = state.last_metrics.get(main_metric)
    mfu = trainer.mfu(tokens_per_s)
    log.info(
        "done: %d steps, final val_%s %s, best val_%s %.4f, wall %.1fs, %s tokens/s, MFU %s, checkpoint %s",
        state.step - start_step,
        main_metric,
        f"{final:.4f}" if final is not None else "-",
        main_metric,
        best,
        time.perf_counter() - started,
        f"{tokens_per_s:,.0f}" if tokens_per_s else "-",
        f"{mfu:.1%}" if mfu is not None else "-",
        run_dir / "checkpoints" / "latest",
    )
    summary = {
        "metric": f"val_{main_metric}",
        f"best_val_{main_metric}": best,
        f"final_val_{main_metric}": final,
        "objective": -best if higher_is_better else best,
        "steps": state.step,
        "tokens": state.tokens_seen,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        **(
            {"peak_memory_gb": torch.cuda.max_memory_allocated(trainer.device) / 1e9}
            if trainer.device.type == "cuda"
            else {}
        ),
        "skipped_steps": state.skipped_steps,
        "checkpoint": str(checkpoint.resolve(run_dir)),
    }
    if keep_best:
        best_dir = run_dir / "checkpoints" / "best"
        summary["best_checkpoint"] = str(best_dir) if (best_dir / checkpoint.COMPLETE_MARKER).is_file() else None
    return summary
