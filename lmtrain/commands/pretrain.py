"""`lmtrain pretrain`: tokens → model → optimizer → Trainer → metrics and checkpoints in the run dir."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmtrain import checkpoint
from lmtrain.config import PretrainConfig, accumulation_steps
from lmtrain.data import tokens
from lmtrain.distributed import resolve_device
from lmtrain.errors import UserError
from lmtrain.losses import cross_entropy
from lmtrain.model import TransformerConfig, TransformerLM
from lmtrain.optim import build_optimizer, build_scheduler
from lmtrain.run_log import MetricsFile, perplexity
from lmtrain.trainer import Trainer

log = logging.getLogger("lmtrain")


def _resume_source(resume: bool | str, run_dir: Path) -> Path | None:
    if resume is False or resume == "false":
        if checkpoint.complete_steps(run_dir / "checkpoints"):
            raise UserError(
                f"trainer.resume: run dir '{run_dir}' already holds checkpoints; pass trainer.resume=true to "
                "continue it, or choose a new hydra.run.dir"
            )
        return None
    if resume is True or resume == "true":
        if not checkpoint.complete_steps(run_dir / "checkpoints"):
            log.warning(
                "trainer.resume=true: no checkpoint in %s, starting from scratch (to continue a run, "
                "pass its folder as hydra.run.dir)",
                run_dir,
            )
            return None
        return checkpoint.resolve(run_dir, "trainer.resume")
    return checkpoint.resolve(resume, "trainer.resume")


def run(cfg: PretrainConfig, run_dir: str) -> dict:
    """Train; returns the run's summary, whose `objective` (best validation loss) Hydra sweepers minimise."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("several processes (torchrun) are not supported yet: run lmtrain as one process")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"hydra.run.dir: cannot create '{run_dir}': {err.strerror}") from None
    t, m = cfg.trainer, cfg.model
    device = resolve_device(t.device)
    source = _resume_source(t.resume, run_dir)

    data = tokens.prepare(
        train=cfg.data.train,
        validation=cfg.data.validation,
        val_fraction=cfg.data.val_fraction,
        text_field=cfg.data.text_field,
        tokenizer=cfg.data.tokenizer,
        vocab_size=cfg.data.vocab_size,
        max_chars=cfg.data.max_chars,
        cache_dir=cfg.data.cache_dir,
    )
    tokenizer_json = data.tokenizer.to_str()
    (run_dir / "tokenizer.json").write_text(tokenizer_json)
    log.info(
        "data: %s train / %s validation tokens, vocabulary %d (cache %s)",
        f"{len(data.train):,}",
        f"{len(data.validation):,}",
        data.tokenizer.get_vocab_size(),
        data.cache_path,
    )

    torch.manual_seed(t.seed)
    model_config = TransformerConfig(vocab_size=data.tokenizer.get_vocab_size(), **dataclasses.asdict(m))
    model = TransformerLM(model_config).to(device)
    log.info(
        "model: %s parameters, %.2f MFLOPs per token (training)",
        f"{model.num_parameters():,}",
        model.flops_per_token() / 1e6,
    )
    accum_steps = accumulation_steps(cfg.grad_accum, t.micro_batch_size, m.max_seq_len, world_size=1)
    o, s = cfg.optimizer, cfg.scheduler
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
    scheduler = build_scheduler(
        optimizer,
        name=s.name,
        lr=o.lr,
        warmup_steps=s.warmup_steps,
        max_steps=t.max_steps,
        min_lr=s.min_lr,
        decay_fraction=s.decay_fraction,
    )
    loss_fn = partial(
        cross_entropy,
        label_smoothing=cfg.loss.label_smoothing,
        z_loss=cfg.loss.z_loss,
        ignore_index=cfg.loss.ignore_index,
    )
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        loss_fn,
        device=device,
        precision=t.precision,
        grad_clip=o.grad_clip,
        ignore_index=cfg.loss.ignore_index,
        compile=t.compile,
    )
    sampler = tokens.WindowSampler(data.train, m.max_seq_len, t.seed)
    validation = tokens.validation_batches(data.validation, m.max_seq_len, t.eval_batches, t.micro_batch_size)

    model_json = json.dumps(dataclasses.asdict(model_config), indent=2)
    if source is not None:
        _restore(source, trainer, sampler, model_json, tokenizer_json)
        log.info("resumed from %s at step %d", source, trainer.state.step)
        for moved in checkpoint.set_aside_after(run_dir / "checkpoints", trainer.state.step):
            log.warning("set aside %s: it continued the run past the checkpoint resumed from", moved)
    metrics = MetricsFile(
        run_dir / "metrics.jsonl",
        resume_step=trainer.state.step if source else None,
        tensorboard_dir=run_dir / "tensorboard" if t.tensorboard else None,
    )
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    start_step, start_tokens = trainer.state.step, trainer.state.tokens_seen

    def save_checkpoint() -> None:
        rng = {
            "torch_cpu": torch.get_rng_state(),
            **{f"sampler.{k}": v for k, v in sampler.state_dict().items()},
        }
        if device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "trainer": trainer.state.state_dict(),
            "scheduler": scheduler.state_dict(),
            "grad_scaler": trainer.scaler.state_dict(),
        }
        files = {"config.yaml": config_yaml, "model.json": model_json, "tokenizer.json": tokenizer_json}
        checkpoint.save(
            run_dir / "checkpoints",
            trainer.state.step,
            model=model,
            optimizer=optimizer,
            rng=rng,
            trainer_state=state,
            files=files,
        )
        checkpoint.prune(run_dir / "checkpoints", t.keep_last)

    def evaluate() -> dict[str, float]:
        loss = trainer.evaluate_loss(validation)
        return {"loss": loss, "ppl": perplexity(loss)}

    try:
        trainer.fit(
            lambda: sampler.next_step(accum_steps, t.micro_batch_size),
            evaluate,
            max_steps=t.max_steps,
            eval_every=t.eval_every,
            log_every=t.log_every,
            checkpoint_every=t.checkpoint_every,
            write_metrics=metrics.write,
            save_checkpoint=save_checkpoint,
            progress_bar=t.progress_bar,
        )
    finally:
        metrics.close()

    state = trainer.state
    tokens_this_run = state.tokens_seen - start_tokens
    tokens_per_s = tokens_this_run / state.train_seconds if tokens_this_run and state.train_seconds > 0 else None
    best = state.best_metric if state.best_metric is not None else float("nan")
    final = state.last_metrics.get("loss")
    latest = run_dir / "checkpoints" / "latest"
    log.info(
        "done: %d steps, final val_loss %s, best val_loss %.4f, wall %.1fs, %s tokens/s, checkpoint %s",
        state.step - start_step,
        f"{final:.4f}" if final is not None else "-",
        best,
        time.perf_counter() - started,
        f"{tokens_per_s:,.0f}" if tokens_per_s else "-",
        latest,
    )
    log.info('try: lmtrain generate ckpt=%s prompt="def "', latest)
    return {
        "metric": "val_loss",
        "objective": best,
        "best_val_loss": best,
        "final_val_loss": final,
        "steps": state.step,
        "tokens": state.tokens_seen,
        "tokens_per_s": tokens_per_s,
        "checkpoint": str(checkpoint.resolve(run_dir)),
    }


def _restore(source: Path, trainer: Trainer, sampler: tokens.WindowSampler, model_json: str, tokenizer_json: str):
    with checkpoint.readable(source, "trainer.resume"):
        if (source / "model.json").read_text() != model_json:
            raise UserError(f"trainer.resume: the model in '{source}' differs from this run's model config")
        if (source / "tokenizer.json").read_text() != tokenizer_json:
            raise UserError(f"trainer.resume: the tokenizer in '{source}' differs from this run's data config")
        checkpoint.load_weights(trainer.model, source)
        checkpoint.load_optimizer(trainer.optimizer, source)
        state = checkpoint.load_json(source, checkpoint.COMPLETE_MARKER)
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["grad_scaler"])
        trainer.state.load_state_dict(state["trainer"])
        rng = checkpoint.load_rng(source)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], trainer.device)
    sampler.load_state_dict({k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith("sampler.")})
