"""Assembly: builds the Trainer of a pretrain or finetune run from its config (placement, optimizer, schedule,
loss, teacher) and runs it in its run dir, resuming first when asked; returns the run's summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.load import load_model, load_side_files
from lmtrain.checkpoint.parts import RngState, Stateful
from lmtrain.checkpoint.resume import restore
from lmtrain.checkpoint.strategy import Strategy as CheckpointStrategy
from lmtrain.checkpoint.strategy import strategy_for
from lmtrain.checkpoint.writer import Writer
from lmtrain.config import FinetuneConfig, PretrainConfig, SchedulerConfig, TrainerConfig
from lmtrain.config.choices import Strategy
from lmtrain.core import devices, distributed
from lmtrain.core.distributed import Placement
from lmtrain.core.errors import Diverged, UserError
from lmtrain.data.sampler import Sampler
from lmtrain.model.transformer import TransformerLM
from lmtrain.train.ema import EMA
from lmtrain.train.losses import TEACHER_LOSSES, build_loss
from lmtrain.train.objective import Objective
from lmtrain.train.optim import WHOLE_MATRICES, build_optimizer, peak_lr
from lmtrain.train.run_dir import take_over
from lmtrain.train.schedules import ResumedSchedule, build_scheduler
from lmtrain.train.sinks import Sinks, open_sinks
from lmtrain.train.trainer import Cadence, Trainer

log = logging.getLogger("lmtrain")


def check_options(cfg: PretrainConfig | FinetuneConfig) -> None:
    """The rules an option sets on the rest of the config; the commands check them before reading any data.
    Raises UserError."""
    if cfg.loss.name in TEACHER_LOSSES and not cfg.loss.teacher:
        raise UserError(
            f"loss.teacher: missing; loss={cfg.loss.name} needs loss.teacher=outputs/<run>/checkpoints/latest"
        )
    if cfg.optimizer.name in WHOLE_MATRICES and cfg.trainer.strategy is Strategy.fsdp:
        raise UserError(
            f"optimizer={cfg.optimizer.name}: not supported with trainer.strategy=fsdp, which shards the matrices it"
            " orthogonalises (use ddp, or optimizer=adamw)"
        )


def build_trainer(
    model: TransformerLM,
    cfg: PretrainConfig | FinetuneConfig,
    placement: Placement,
    max_steps: int,
    *,
    tokenizer_json: str,
    class_weights: torch.Tensor | None = None,
    objective: Objective | None = None,
) -> Trainer:
    """The model placed (single, DDP or FSDP), then optimizer, schedule and loss (and, for a loss that reads a
    teacher, the teacher) from the shared config groups; a task's `objective` replaces the loss."""
    o, t, lo = cfg.optimizer, cfg.trainer, cfg.loss
    device = placement.device
    teacher = None
    if lo.name in TEACHER_LOSSES:
        assert lo.teacher, "check_options asks for it before a run reads its data"
        teacher = load_teacher(lo.teacher, model, tokenizer_json, device)
    model.activation_checkpointing = t.activation_checkpointing
    parallel = distributed.wrap(model, placement, t.precision)
    optimizer = build_optimizer(model, o, device)
    return Trainer(
        model,
        optimizer,
        build_scheduler(optimizer, _fitted(cfg.scheduler, max_steps), peak_lr(o), max_steps),
        build_loss(lo, class_weights),
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
        ema=EMA(model, t.ema_decay) if t.ema_decay is not None else None,
        early_stopping_patience=t.early_stopping_patience,
        objective=objective,
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


def checkpoint_parts(trainer: Trainer, sampler: Sampler) -> dict[str, Stateful]:
    """The run's stateful parts by name, as its checkpoints keep them (lmtrain.checkpoint.parts)."""
    parts: dict[str, Stateful] = {
        "model": trainer.model,
        "optimizer": trainer.optimizer,
        "trainer": trainer.state,
        "scheduler": ResumedSchedule(trainer.scheduler),
        "grad_scaler": trainer.scaler,
    }
    if trainer.ema is not None:
        parts["ema"] = trainer.ema
    if trainer.objective is not None:
        parts["objective"] = trainer.objective
    return {**parts, "rng": RngState(trainer.device), "sampler": sampler}


def _fitted(s: SchedulerConfig, max_steps: int) -> SchedulerConfig:
    """The schedule; a warmup longer than the run (`trainer.max_steps=5`, a quick try) is cut to fit it."""
    if s.warmup_steps <= max_steps:
        return s
    log.warning("scheduler.warmup_steps: %d is longer than the run; cut to its %d steps", s.warmup_steps, max_steps)
    return dataclasses.replace(s, warmup_steps=max_steps)


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
    parts, strategy = _restored(trainer, sampler, source, files, run_dir)
    if trainer.placement.is_main:
        take_over(run_dir, files["tokenizer.json"])
    sinks = _sinks(trainer, run_dir, source, settings, files["config.yaml"], data_counts)
    writer = Writer(run_dir, parts, strategy, files, settings.keep_last)
    state = trainer.state
    start = _Start(state.step, state.tokens_seen, state.train_seconds, started)
    try:
        trainer.fit(
            next_step,
            evaluate,
            cadence=Cadence(max_steps, eval_every, settings.log_every, settings.checkpoint_every),
            sink=sinks,
            save_checkpoint=lambda: writer.save(state.step),
            save_best=(lambda: writer.save(state.step, "best")) if keep_best else None,
            main_metric=main_metric,
            higher_is_better=higher_is_better,
            progress_bar=settings.progress_bar,
            accounting=accounting,
        )
        summary = _summary(trainer, start, run_dir, main_metric, higher_is_better, keep_best)
        sinks.summary(summary)
    except Diverged as err:
        raise _diverged(err, run_dir) from None
    finally:
        sinks.close()
    return summary


def _diverged(err: Diverged, run_dir: Path) -> Diverged:
    last = checkpoint.complete_steps(run_dir / "checkpoints")
    kept = f"{last[-1]} is the last finite checkpoint and stays latest" if last else "no checkpoint was written"
    return Diverged(f"{err}; {kept}. Lower optimizer.lr, set optimizer.grad_clip, or pass trainer.on_nonfinite=skip")


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where this process began training: a resumed run's step, tokens seen and training seconds (else 0s), and
    time.perf_counter() when its command started."""

    step: int
    tokens: int
    seconds: float
    wall: float


def _restored(
    trainer: Trainer, sampler: Sampler, source: Path | None, files: dict[str, str], run_dir: Path
) -> tuple[dict[str, Stateful], CheckpointStrategy]:
    """The run's checkpoint parts and the placement's strategy for writing them, restored from `source`."""
    parts, strategy = checkpoint_parts(trainer, sampler), strategy_for(trainer.placement)
    if source is not None:
        restore(source, parts, strategy, files, run_dir)
    return parts, strategy


def _sinks(
    trainer: Trainer,
    run_dir: Path,
    source: Path | None,
    settings: TrainerConfig,
    config_yaml: str,
    data_counts: dict[str, int] | None,
) -> Sinks:
    """The run's metric sinks (kept up to the resumed step); a fresh run's open with `data_counts` at step 0."""
    resume_step = trainer.state.step if source is not None else None
    sinks = open_sinks(run_dir, resume_step, settings, config_yaml, trainer.placement.is_main)
    if data_counts and source is None:
        sinks.write({"step": 0, **data_counts}, "data")
    return sinks


def _summary(
    trainer: Trainer, start: _Start, run_dir: Path, main_metric: str, higher_is_better: bool, keep_best: bool
) -> dict:
    """The run's result.json body (and its log line): best and final validation, throughput, MFU, checkpoints."""
    state = trainer.state
    tokens, seconds = state.tokens_seen - start.tokens, state.train_seconds - start.seconds
    tokens_per_s = tokens / seconds if tokens and seconds > 0 else None
    best = state.best_metric if state.best_metric is not None else float("nan")
    final = state.last_metrics.get(main_metric)
    mfu = trainer.mfu(tokens_per_s)
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
    _log_done(summary, main_metric, state.step - start.step, time.perf_counter() - start.wall, run_dir)
    return summary


def _log_done(summary: dict, main_metric: str, steps: int, wall_seconds: float, run_dir: Path) -> None:
    """The run's last log line, from its summary; `steps`: those this process trained."""
    final, tokens_per_s, mfu = summary[f"final_val_{main_metric}"], summary["tokens_per_s"], summary["mfu"]
    log.info(
        "done: %d steps, final val_%s %s, best val_%s %.4f, wall %.1fs, %s tokens/s, MFU %s, checkpoint %s",
        steps,
        main_metric,
        f"{final:.4f}" if final is not None else "-",
        main_metric,
        summary[f"best_val_{main_metric}"],
        wall_seconds,
        f"{tokens_per_s:,.0f}" if tokens_per_s else "-",
        f"{mfu:.1%}" if mfu is not None else "-",
        run_dir / "checkpoints" / "latest",
    )
