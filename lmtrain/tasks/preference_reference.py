"""The reference model of a preference run, and scoring pairs against it.

The losses with a reference (dpo, ipo, robust, hinge) read it one of three ways:
  a frozen copy of init_from (loaded like the distillation teacher, in the run's precision, never in the optimizer)
  adapter=lora: the policy itself with its adapters off (no second copy in memory)
  task.reference=precompute: its log-probs computed once before training (the frozen copy is loaded, used and
  freed) and kept in the run dir's reference_logps.safetensors, which a resumed run reads back
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from lmtrain.checkpoint.load import load_model
from lmtrain.config import FinetuneConfig
from lmtrain.config.choices import AdapterName, PreferenceLoss, Reference
from lmtrain.core import safe_io
from lmtrain.core.dtypes import autocast_dtype
from lmtrain.core.errors import UserError
from lmtrain.data.examples import Example, fixed_batches
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks.base import autocast
from lmtrain.train import preference as losses
from lmtrain.train.build import load_teacher

if TYPE_CHECKING:
    from lmtrain.tasks.preference import Preference

log = logging.getLogger("lmtrain")
CACHE_FILE = "reference_logps.safetensors"


def settings_of(task: Preference) -> tuple[PreferenceLoss, losses.Settings]:
    d = task.info.decoding
    return PreferenceLoss(d["loss"]), losses.Settings(d["beta"], d["gamma"], d["label_smoothing"])


def check_settings(cfg: FinetuneConfig) -> None:
    """The rules of task=preference on the rest of the config. Raises UserError."""
    t = cfg.task
    if t.beta <= 0:
        raise UserError(f"task.beta: {t.beta} must be positive")
    if not 0 <= t.label_smoothing < 0.5:
        raise UserError(f"task.label_smoothing: {t.label_smoothing} must lie in [0, 0.5)")
    if str(cfg.trainer.strategy) == "fsdp":
        raise UserError("trainer.strategy=fsdp: task=preference runs single-process or ddp")


def _run_ref(model: TransformerLM, inputs: torch.Tensor, device: torch.device, amp: torch.dtype | None):
    with autocast(device, amp):
        return model(inputs.to(device))


def precompute(
    task: Preference, reference: TransformerLM, examples: list[Example], batch_size: int, amp: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The reference's summed answer log-probs of every pair: key -> [pairs, 2] (chosen, rejected), fp32 on
    the CPU, the row of a pair its index."""
    device = next(reference.parameters()).device
    sizes: dict[str, int] = {}
    for e in examples:
        sizes[e.key] = max(sizes.get(e.key, 0), e.index + 1)  # type: ignore[attr-defined]
    cache = {key: torch.zeros(n, 2) for key, n in sizes.items()}
    with torch.no_grad():
        for tokens, t in fixed_batches(examples, batch_size, task.collate):
            logits = _run_ref(reference, tokens, device, amp)
            logps = losses.sequence_logps(logits, t["targets"].to(device), t["ignore_index"])[0].cpu()
            cache[t["key"]][t["pairs"]] = torch.stack(logps.chunk(2), dim=-1)
    return cache


def build_objective(
    task: Preference,
    cfg: FinetuneConfig,
    model: TransformerLM,
    device: torch.device,
    examples: list[Example],
    run_dir: Path,
    resuming: bool,
    is_main: bool = True,
) -> losses.PreferenceObjective:
    """The run's objective and the task's reference for validation. `examples`: every pair the run scores
    (train and validation), for task.reference=precompute."""
    check_settings(cfg)
    loss, settings = settings_of(task)
    reference = None
    if loss not in losses.REFERENCE_FREE:
        assert cfg.init_from is not None, "init_from is checked before the run"
        task.info.decoding["reference_from"] = cfg.init_from  # lmtrain evaluate loads it from there
        tokenizer_json = task.tokenizer.to_str()
        if cfg.task.reference is Reference.precompute:
            reference = losses.Reference(cache=_cached(task, cfg, model, device, examples, run_dir, resuming, is_main))
        elif cfg.adapter.name is AdapterName.lora:
            reference = losses.Reference(adapters=True)
            log.info("preference: the reference is init_from, the policy with its LoRA adapters off")
        else:
            frozen = load_teacher(cfg.init_from, model, tokenizer_json, device)
            reference = losses.Reference(model=frozen)
    task.reference = reference
    return losses.PreferenceObjective(loss, settings, reference, device)


def _cached(
    task: Preference,
    cfg: FinetuneConfig,
    model: TransformerLM,
    device: torch.device,
    examples: list[Example],
    run_dir: Path,
    resuming: bool,
    is_main: bool,
) -> dict[str, torch.Tensor]:
    path = run_dir / CACHE_FILE
    if resuming and path.is_file():
        log.info("preference: reference log-probs read from %s", path)
        return {k: v.to(device) for k, v in load_file(str(path)).items()}
    assert cfg.init_from is not None, "init_from is checked before the run"
    frozen = load_teacher(cfg.init_from, model, task.tokenizer.to_str(), device)
    amp = autocast_dtype(cfg.trainer.precision)
    cache = precompute(task, frozen, examples, cfg.trainer.micro_batch_size, amp)
    del frozen
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with safe_io.writing(path):
            save_file(cache, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").replace(path)
    log.info("preference: reference log-probs of %d pairs computed and kept in %s", len(examples), path)
    return {k: v.to(device) for k, v in cache.items()}


def reference_for(task: Preference, device: torch.device) -> losses.Reference | None:
    """The reference `lmtrain evaluate` scores against: the run's, or init_from loaded frozen (None: the loss
    needs none)."""
    if task.reference is not None or not task.needs_reference(task.info):
        return task.reference
    source = task.info.decoding.get("reference_from")
    if not source:
        raise UserError("task.json: the preference run names no reference model (reference_from)")
    frozen, _ = load_model(source, device, key="reference_from")
    task.reference = losses.Reference(model=frozen.eval().requires_grad_(False))
    return task.reference


def score_pairs(
    task: Preference, model: TransformerLM, batch: tuple[Any, dict], device: torch.device, amp: torch.dtype | None
) -> torch.Tensor:
    """Sums over a batch's pairs of (loss, chosen reward, rejected reward, accuracy, margin), float64 [5]."""
    loss, settings = settings_of(task)
    reference = reference_for(task, device)
    ref = None
    if reference is not None:
        ref = reference.logps(lambda x, m: _run_ref(m, x, device, amp), model, batch)
    logits = _run_ref(model, batch[0], device, amp)
    objective = losses.PreferenceObjective(loss, settings, None, device)
    per_pair, chosen, rejected, metrics = objective.scores(logits, batch, ref)
    margin = chosen - rejected
    columns = (per_pair, chosen, rejected, (margin > 0).float(), margin)
    return torch.stack([c.detach().double().sum().cpu() for c in columns])
