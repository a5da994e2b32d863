"""`lmtrain finetune`: a pretrained checkpoint adapted to a task (lmtrain.tasks.registry: lm, classification,
seq2seq, qa, chat, or a registered one).

Weights and tokenizer come from `init_from`; the task fits the model's head (a fresh classification head).
The run dir holds what a pretraining run holds, plus `checkpoints/best` (by the task's main validation
metric), and every checkpoint carries `task.json` so evaluate/predict/generate know how the model was trained.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.load import (
    adapter_record,
    load_model,
    load_special_tokens,
    weights_digest,
)
from lmtrain.checkpoint.resume import resume_source
from lmtrain.config import FinetuneConfig, TrainerConfig
from lmtrain.core import distributed
from lmtrain.core.dtypes import autocast_dtype
from lmtrain.core.errors import UserError
from lmtrain.data.examples import Example, ExampleBatches, read_records, split_off, usable_records
from lmtrain.data.tokenizer import SpecialTokens
from lmtrain.evals.training import main_metric_args, suite_evaluation
from lmtrain.model.lora import add_lora
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks.base import Task, TaskInfo, load_task_info
from lmtrain.tasks.records import data_fields
from lmtrain.tasks.registry import build_task_info, task_class, task_for
from lmtrain.train import build as runs
from lmtrain.train import finetune_defaults
from lmtrain.train.run_dir import claimed

log = logging.getLogger("lmtrain")


def run(cfg: FinetuneConfig, run_dir: str) -> dict:
    """Finetune; returns the run's summary, with the objective Hydra sweepers minimise."""
    with claimed(Path(run_dir)):
        return _run(cfg, Path(run_dir))


def _run(cfg: FinetuneConfig, run_dir: Path) -> dict:
    started = time.perf_counter()
    t, d = cfg.trainer, cfg.data
    runs.check_options(cfg)
    # both required by config.checks before a run starts
    assert cfg.init_from is not None and d.train is not None, "init_from and data.train are checked before the run"
    placement = distributed.place(t.strategy, t.device, t.dist_timeout_s, t.dist_join_timeout_s)
    device = placement.device
    source = resume_source(t.resume, run_dir)
    model, tokenizer = load_model(cfg.init_from, device, key="init_from")
    special = load_special_tokens(cfg.init_from, tokenizer, key="init_from")
    info, task, train_examples, val_examples, counts = _examples(cfg, tokenizer, special, model.config.max_seq_len)
    adapter_json = _prepare_model(cfg, model, task)
    cfg = _derived(cfg, model, len(train_examples), placement.world_size)
    t, val_examples = cfg.trainer, _validation_share(cfg, val_examples)
    tokenizer_json = tokenizer.to_str()
    accum_steps = cfg.grad_accum.steps
    batches, max_steps, eval_every = _schedule(cfg, model, task, train_examples, placement.world_size)
    loss_options = task.loss_options(cfg, train_examples)
    objective = task.objective(cfg, model, placement, train_examples + val_examples, run_dir, source is not None)
    trainer = runs.build_trainer(
        model, cfg, placement, max_steps, tokenizer_json=tokenizer_json, objective=objective, **loss_options
    )
    files = runs.run_files(cfg, model, tokenizer_json) | {"task.json": json.dumps(info.to_dict(), indent=2)}
    if adapter_json:
        files[checkpoint.ADAPTER_FILE] = adapter_json
    suite = suite_evaluation(t, model, tokenizer, special, device, lambda: trainer.state.step, max_steps)
    evaluate = _validation(t, task, model, val_examples, device, suite)
    metric = main_metric_args(t, task.main_metric, task.higher_is_better, keep_best=True)
    summary = runs.train(
        trainer,
        batches,
        lambda: task.step_batches(trainer, batches.next_step(accum_steps, placement.rank, placement.world_size)),
        evaluate,
        run_dir=run_dir,
        files=files,
        source=source,
        settings=t,
        max_steps=max_steps,
        eval_every=eval_every,
        started=started,
        **metric,
        data_counts=counts,
    )
    best = metric["main_metric"]
    log.info("best checkpoint (val_%s %.4f): %s", best, summary[f"best_val_{best}"], summary["best_checkpoint"])
    return summary


def _validation(
    t: TrainerConfig, task: Task, model: TransformerLM, examples: list[Example], device: torch.device, suite
) -> Callable[[], dict[str, float]]:
    """The run's validation: the task's metrics on `examples` (numbers only) and the benchmark suite's."""

    def evaluate() -> dict[str, float]:
        amp, size = autocast_dtype(t.precision), t.micro_batch_size
        result = task.evaluate(model, examples, batch_size=size, device=device, amp_dtype=amp, seed=t.seed)
        return {k: v for k, v in result.items() if isinstance(v, int | float)} | suite()

    return evaluate


def _examples(
    cfg: FinetuneConfig, tokenizer: Tokenizer, special: SpecialTokens, max_seq_len: int
) -> tuple[TaskInfo, Task, list[Example], list[Example], dict[str, int]]:
    """The task, read from data.train (fields, labels), and its train and validation examples, with the
    counts of records skipped."""
    t, d = cfg.trainer, cfg.data
    assert d.train is not None, "data.train is checked before the run"
    fields = data_fields(cfg.data)
    kind = task_class(cfg.task.name)
    train_records = read_records(d.train, "data.train", txt_by=kind.text_unit)
    instruction = kind.is_instruction(fields, train_records[0])
    types = kind.record_types(TaskInfo(cfg.task.name, fields, instruction=instruction))
    required = list(types)
    missing = [f for f in required if f not in train_records[0]]
    if missing:
        raise UserError(
            f"data.train: '{d.train}' has no field '{missing[0]}'; its fields are "
            f"{', '.join(train_records[0])} (set data.<role>_field to the right name)"
        )
    train_records, skipped = usable_records(train_records, types, "data.train", d.train, d.on_bad_record)
    counts = {"skipped_train_records": skipped}
    info = build_task_info(cfg.task, fields, train_records)
    task = task_for(info, tokenizer, max_seq_len, special)
    train_examples = task.encode(train_records, "data.train", d.train)
    if d.validation:
        records = read_records(
            d.validation, "data.validation", None if kind.whole_records else required, kind.text_unit
        )
        records, counts["skipped_validation_records"] = usable_records(
            records, types, "data.validation", d.validation, d.on_bad_record
        )
        val_examples = task.encode(records, "data.validation", d.validation)
    else:  # held out after encoding, so evaluate/export can hold out the same examples again
        train_examples, val_examples = split_off(train_examples, d.val_fraction, t.seed)
    counts |= task.counts
    log.info("data: %d train / %d validation examples, task %s", len(train_examples), len(val_examples), info.name)
    return info, task, train_examples, val_examples, counts


def _derived(cfg: FinetuneConfig, model: TransformerLM, examples: int, world_size: int) -> FinetuneConfig:
    """cfg with its null epochs, micro-batch size and learning rate derived (lmtrain.train.finetune_defaults)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg, line = finetune_defaults.derived(cfg, examples, trainable, world_size)
    if line:
        log.info(line)
    return cfg


def _validation_share(cfg: FinetuneConfig, val_examples: list[Example]) -> list[Example]:
    """The validation examples scored at each validation: the first task.max_eval_examples, or the first
    trainer.eval_batches × micro_batch_size."""
    t = cfg.trainer
    limit = cfg.task.max_eval_examples or t.eval_batches * t.micro_batch_size
    if len(val_examples) > limit:
        why = "task.max_eval_examples" if cfg.task.max_eval_examples else "trainer.eval_batches × micro_batch_size"
        log.info("validation: the first %d of %d examples (%s)", limit, len(val_examples), why)
    return val_examples[:limit]


def _prepare_model(cfg: FinetuneConfig, model: TransformerLM, task: Task) -> str | None:
    """The model made ready for the task: its head, dropout, frozen parts and LoRA adapters; returns the
    adapter record (adapter.json) of a LoRA run."""
    assert cfg.init_from is not None, "init_from is checked before the run"
    torch.manual_seed(cfg.trainer.seed)
    task.fit_head(model, cfg.task, load_task_info(cfg.init_from, "init_from"))
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    if cfg.freeze_blocks > model.config.num_layers:
        raise UserError(f"freeze_blocks: {cfg.freeze_blocks} exceeds the {model.config.num_layers} blocks of init_from")
    model.freeze(embeddings=cfg.freeze_embeddings, first_blocks=cfg.freeze_blocks)
    adapter_json = None
    if cfg.adapter.name == "lora":  # the base is frozen; only the adapters (and a fresh task head) train
        a = cfg.adapter
        digest = weights_digest(cfg.init_from, "init_from")
        layers = add_lora(model, list(a.target_modules), a.rank, a.alpha, a.dropout)
        if model.classifier is not None:
            model.classifier.requires_grad_(True)
        settings = {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout}
        adapter_json = adapter_record(cfg.init_from, digest, settings, layers)
    return adapter_json


def _schedule(
    cfg: FinetuneConfig, model: TransformerLM, task: Task, train_examples: list[Example], world_size: int
) -> tuple[ExampleBatches, int, int]:
    """The training batches, the run's length in steps (epochs, capped by trainer.max_steps when set) and the
    validation interval (trainer.eval_every when set, else evals_per_epoch)."""
    t, d = cfg.trainer, cfg.data
    accum_steps = cfg.grad_accum.steps
    if d.packing and not task.packable:
        raise UserError(f"data.packing: task={task.info.name} reads one whole sequence per example; it cannot pack")
    pack_width = (d.pack_len or model.config.max_seq_len) if d.packing else None
    if pack_width is not None and pack_width > model.config.max_seq_len:
        raise UserError(f"data.pack_len: {pack_width} exceeds the model's max_seq_len={model.config.max_seq_len}")
    collate = partial(task.collate if pack_width is None else task.collate_rows, ignore_index=cfg.loss.ignore_index)
    batches = ExampleBatches(train_examples, t.micro_batch_size, t.seed, collate, pack_width)
    steps_per_epoch = batches.steps_per_epoch(accum_steps, world_size)
    assert cfg.epochs is not None, "a null epochs is derived before the schedule"
    max_steps, eval_every = math.ceil(cfg.epochs * steps_per_epoch), t.eval_every
    if t.max_steps is not None and t.max_steps < max_steps:
        log.info(
            "epochs=%s would be %d steps; trainer.max_steps caps the run at %d", cfg.epochs, max_steps, t.max_steps
        )
        max_steps = t.max_steps
    if eval_every is None:
        assert cfg.evals_per_epoch is not None, "config.checks asks for one of them"
        eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
        log.info("validation every %d steps (evals_per_epoch=%d)", eval_every, cfg.evals_per_epoch)
    log.info(
        "model: %s parameters (%s trainable); %d steps of %d micro-batches (%d steps per epoch)",
        f"{model.num_parameters():,}",
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}",
        max_steps,
        accum_steps,
        steps_per_epoch,
    )
    return batches, max_steps, eval_every
