"""What every training command shares around the Trainer: the run dir, resuming, checkpoint writing."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import yaml

from lmtrain import checkpoint, checkpoint_meta, devices, distributed, run_lock
from lmtrain.config import TrainerConfig
from lmtrain.distributed import Placement
from lmtrain.errors import Diverged, RunRefused, UserError
from lmtrain.losses import cross_entropy, distillation
from lmtrain.model import TransformerLM
from lmtrain.optim import build_optimizer, build_scheduler
from lmtrain.pretrained import load_model
from lmtrain.run_log import MetricsFile
from lmtrain.safe_io import clean_temporaries, read_text_capped, write_text_atomic
from lmtrain.trainer import Trainer

log = logging.getLogger("lmtrain")


class Sampler(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"hydra.run.dir: cannot create '{run_dir}': {err.strerror}") from None


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[None]:
    """The run dir, created if needed and locked for the block by the main process (RunDirBusy if another
    live process holds it)."""
    prepare_run_dir(run_dir)
    if distributed.torchrun_rank() != 0:
        yield
        return
    with run_lock.locked(run_dir):
        yield


def resume_source(resume: bool | str, run_dir: Path) -> Path | None:
    """The checkpoint trainer.resume names: None (fresh start), this run dir's newest valid one, or a path.
    Every refusal is a RunRefused: nothing has been written into the run dir yet."""
    root = run_dir / "checkpoints"
    if resume is False or resume == "false":
        if checkpoint.complete_steps(root):
            raise RunRefused(
                f"trainer.resume: run dir '{run_dir}' already holds checkpoints; pass trainer.resume=true to "
                "continue it, or choose a new hydra.run.dir"
            )
        return None
    try:
        if resume is True or resume == "true":
            if not checkpoint.complete_steps(root):
                log.warning(
                    "trainer.resume=true: no checkpoint in %s, starting from scratch (to continue a run, "
                    "pass its folder as hydra.run.dir)",
                    run_dir,
                )
                return None
            checkpoint.resolve(run_dir, "trainer.resume")  # refuses a `latest` that points elsewhere
            source, damaged = checkpoint.newest_valid(root)
            if source is None:
                raise UserError(f"trainer.resume: no checkpoint in '{root}' is whole; the newest: {damaged[0][1]}")
            for path, why in damaged:
                log.warning("trainer.resume: skipping damaged checkpoint %s (%s); resuming %s", path, why, source.name)
            return source
        source = checkpoint.resolve(resume, "trainer.resume")
        why = checkpoint_meta.problem(source)
        if why is not None:
            raise UserError(f"trainer.resume: {why}")
        return source
    except RunRefused:
        raise
    except UserError as err:
        raise RunRefused(str(err)) from None


def _data_keys(config_yaml: str) -> dict:
    try:
        data = (yaml.safe_load(config_yaml) or {}).get("data") or {}
    except (yaml.YAMLError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def check_compatible(source: Path, files: dict[str, str]) -> None:
    """Refuse (RunRefused) a checkpoint whose tokenizer or model shape is not this run's, naming what differs:
    the data keys behind a different tokenizer, or the model fields."""
    key = "trainer.resume"
    saved = checkpoint_meta.read_json(source / "tokenizer.json", key)
    if saved != json.loads(files["tokenizer.json"]):
        theirs = _data_keys(read_text_capped(source / "config.yaml", checkpoint_meta.MAX_JSON_BYTES, key))
        ours = _data_keys(files["config.yaml"])
        changed = [f"data.{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in ours if theirs.get(k) != ours[k]]
        raise RunRefused(
            f"{key}: the tokenizer in '{source}' differs from this run's"
            + (f" ({'; '.join(changed)})" if changed else "")
        )
    saved_model = checkpoint_meta.model_config(source, key).__dict__
    ours_model = json.loads(files["model.json"])
    changed = [f"{k} {saved_model.get(k)!r} there, {v!r} here" for k, v in ours_model.items() if saved_model[k] != v]
    if changed:
        raise RunRefused(f"{key}: the model shape in '{source}' differs from this run's config: {'; '.join(changed)}")


def _fqn_order(optimizer_state: dict) -> list:
    return [p for group in optimizer_state["param_groups"] for p in group["params"]]


def _numbered(full: dict) -> dict:
    """A full optimizer state keyed by parameter names (torch.distributed.checkpoint) -> keyed by number,
    as optimizer.state_dict() gives it: the format checkpoints keep whatever the strategy."""
    number = {name: i for i, name in enumerate(_fqn_order(full))}
    groups = [{**g, "params": [number[p] for p in g["params"]]} for g in full["param_groups"]]
    return {"state": {number[k]: v for k, v in full["state"].items()}, "param_groups": groups}


def _named(numbered: dict, names: list[str]) -> dict:
    groups, start = [], 0
    for group in numbered["param_groups"]:
        groups.append({**group, "params": names[start : start + len(group["params"])]})
        start += len(group["params"])
    return {"state": {names[int(k)]: v for k, v in numbered["state"].items()}, "param_groups": groups}


def _full_state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def restore(source: Path, trainer: Trainer, sampler: Sampler, files: dict[str, str], run_dir: Path) -> None:
    """Load every stateful piece from `source` (on every process); model and tokenizer must match this run's.
    A checkpoint holds whole tensors, so any number of processes can resume it."""
    check_compatible(source, files)
    state = checkpoint_meta.trainer_state(source, "trainer.resume")
    adapter = (source / checkpoint.ADAPTER_FILE).is_file()  # holds the trained tensors only; the base is loaded already
    with checkpoint.readable(source, "trainer.resume"):
        _same_optimizer(source, files["config.yaml"])
        optimizer_state = checkpoint.load_optimizer_state(source)
        if trainer.placement.strategy == "fsdp":
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import (
                get_optimizer_state_dict,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            weights = load_file(str(source / "model.safetensors"))
            if trainer.model.config.tie_embeddings and not adapter:  # stored once; the sharded model names both
                shared = weights.get("token_embedding.weight", weights.get("lm_head.weight"))
                weights.update({"token_embedding.weight": shared, "lm_head.weight": shared})
            set_model_state_dict(trainer.model, weights, options=_full_state_options(strict=not adapter))
            current = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=_full_state_options())
            names = _fqn_order(current)
            set_optimizer_state_dict(
                trainer.model, trainer.optimizer, _named(optimizer_state, names), options=_full_state_options()
            )
        else:
            checkpoint.load_weights(trainer.model, source, partial=adapter)
            trainer.optimizer.load_state_dict(optimizer_state)
        trainer.scheduler.load_state_dict(state["scheduler"])
        # the LR of the next step under this run's schedule (the same as saved unless max_steps changed)
        scheduler = trainer.scheduler
        for group, base, factor in zip(
            trainer.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]
        trainer.scaler.load_state_dict(state["grad_scaler"])
        trainer.state.load_state_dict(state["trainer"])
        rng = checkpoint.load_rng(source)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], trainer.device)
    sampler.load_state_dict({k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith("sampler.")})
    log.info("resumed from %s at step %d", source, trainer.state.step)
    root = run_dir / "checkpoints"
    if trainer.placement.is_main:
        for moved in checkpoint.set_aside_after(root, trainer.state.step):
            log.warning("set aside %s: it continued the run past the checkpoint resumed from", moved)
        if source.parent.resolve() == root.resolve():
            checkpoint.point_latest(root, source)  # a kill may have left `latest` one checkpoint behind
    distributed.barrier()


def _same_optimizer(source: Path, config_yaml: str) -> None:
    """An optimizer's state only loads into the same kind of optimizer."""
    import yaml

    if not (source / "config.yaml").is_file():
        return
    saved = (yaml.safe_load((source / "config.yaml").read_text()) or {}).get("optimizer", {}).get("name")
    wanted = (yaml.safe_load(config_yaml) or {}).get("optimizer", {}).get("name")
    if saved and wanted and saved != wanted:
        raise UserError(
            f"trainer.resume: '{source}' was trained with optimizer={saved}; resume it with optimizer={saved}, "
            "or start a new run from its weights (lmtrain finetune init_from=...)"
        )


class Checkpointer:
    """Writes the run's checkpoints: `step_NNNNNNN` (+ `latest`) and, for finetuning, `best`. Every process
    takes part (FSDP gathers whole tensors); the main process writes."""

    def __init__(self, run_dir: Path, trainer: Trainer, sampler: Sampler, files: dict[str, str], keep_last: int):
        self.root = run_dir / "checkpoints"
        self.trainer, self.sampler, self.files, self.keep_last = trainer, sampler, files, keep_last
        # an adapter run saves only what it trains (the adapters, a task head); its base stays where it is
        adapter = checkpoint.ADAPTER_FILE in files
        self.trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad} if adapter else None

    def _gathered(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None, dict]:
        """The model to save (or, for an adapter run, the trained tensors) and the optimizer state."""
        trainer = self.trainer
        trained = self.trained
        if trainer.placement.strategy != "fsdp":
            weights = None if trained is None else {k: v for k, v in trainer.model.state_dict().items() if k in trained}
            return trainer.model, weights, trainer.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        full = get_model_state_dict(trainer.model, options=_full_state_options())
        optimizer_state = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=_full_state_options())
        if not trainer.placement.is_main:
            return trainer.model, None, {}
        if trained is not None:
            return trainer.model, {k: v for k, v in full.items() if k in trained}, _numbered(optimizer_state)
        whole = TransformerLM(trainer.model.config)
        whole.load_state_dict(full)
        return whole, None, _numbered(optimizer_state)

    def _save(self, name: str | None) -> None:
        trainer = self.trainer
        model, weights, optimizer_state = self._gathered()
        if trainer.placement.is_main:
            rng = {"torch_cpu": torch.get_rng_state()}
            rng.update({f"sampler.{k}": v for k, v in self.sampler.state_dict().items()})
            if trainer.device.type == "cuda":
                rng["torch_cuda"] = torch.cuda.get_rng_state(trainer.device)
            state = {
                "trainer": trainer.state.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "grad_scaler": trainer.scaler.state_dict(),
                "world_size": trainer.placement.world_size,
            }
            checkpoint.save(
                self.root,
                trainer.state.step,
                model=model,
                optimizer_state=optimizer_state,
                rng=rng,
                trainer_state=state,
                files=self.files,
                name=name,
                weights=weights,
            )
            if name is None:
                checkpoint.prune(self.root, self.keep_last)
        distributed.barrier()

    def save(self) -> None:
        self._save(None)

    def save_best(self) -> None:
        self._save("best")


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
    )
    warmup = s.warmup_steps
    if warmup > max_steps:  # a quick try (`trainer.max_steps=5`) warms up for the whole run
        log.warning("scheduler.warmup_steps: %d is longer than the run; cut to its %d steps", warmup, max_steps)
        warmup = max_steps
    scheduler = build_scheduler(
        optimizer,
        name=s.name,
        lr=o.lr,
        warmup_steps=warmup,
        max_steps=max_steps,
        min_lr=s.min_lr,
        decay_fraction=s.decay_fraction,
    )
    common = dict(
        label_smoothing=lo.label_smoothing, z_loss=lo.z_loss, ignore_index=lo.ignore_index, class_weights=class_weights
    )
    if teacher is not None:
        loss_fn = partial(distillation, temperature=lo.temperature, alpha=lo.alpha, kl=lo.kl, **common)
    else:
        loss_fn = partial(cross_entropy, **common)
    return Trainer(
        model,
        optimizer,
        scheduler,
        loss_fn,
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
    )


def load_teacher(path: str, student: torch.nn.Module, tokenizer_json: str, device: torch.device):
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


class _NoMetrics:
    """What processes other than the main one write: nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics(run_dir: Path, trainer: Trainer, resumed: bool, tensorboard: bool, main: bool = True):
    if not main:
        return _NoMetrics()
    return MetricsFile(
        run_dir / "metrics.jsonl",
        resume_step=trainer.state.step if resumed else None,
        tensorboard_dir=run_dir / "tensorboard" if tensorboard else None,
    )


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
    if main:  # from here on the run writes into its dir: everything it could refuse has been checked
        for path in [*clean_temporaries(run_dir), *checkpoint.clean_leftovers(run_dir / "checkpoints")]:
            log.warning("removed %s: left by an interrupted run", path)
        write_text_atomic(run_dir / "tokenizer.json", files["tokenizer.json"])
    metrics = open_metrics(run_dir, trainer, source is not None, settings.tensorboard, main)
    if data_counts and source is None:
        metrics.write({"step": 0, **data_counts})
    checkpointer = Checkpointer(run_dir, trainer, sampler, files, settings.keep_last)
    state = trainer.state
    start_step, start_tokens, start_seconds = state.step, state.tokens_seen, state.train_seconds
    try:
        trainer.fit(
            next_step,
            evaluate,
            max_steps=max_steps,
            eval_every=eval_every,
            log_every=settings.log_every,
            checkpoint_every=settings.checkpoint_every,
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
