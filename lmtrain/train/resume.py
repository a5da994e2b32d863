"""Where a run continues from (trainer.resume) and restoring every stateful piece from that checkpoint:
weights, optimizer (whole tensors, whatever the strategy), schedule, grad scaler, RNG and data sampler."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import torch
import yaml

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint import meta as checkpoint_meta
from lmtrain.core import distributed
from lmtrain.core.errors import RunRefused, UserError
from lmtrain.core.safe_io import read_text_capped
from lmtrain.train.schedules import resume_schedule
from lmtrain.train.trainer import Trainer

log = logging.getLogger("lmtrain")


class Sampler(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


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
        source = checkpoint.resolve(str(resume), "trainer.resume")
        problem = checkpoint_meta.problem(source)
        if problem is not None:
            raise UserError(f"trainer.resume: {problem}")
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
                shared = weights["token_embedding.weight" if "token_embedding.weight" in weights else "lm_head.weight"]
                weights.update({"token_embedding.weight": shared, "lm_head.weight": shared})
            set_model_state_dict(
                trainer.model, dict(weights), options=checkpoint.full_state_options(strict=not adapter)
            )
            options = checkpoint.full_state_options()
            names = checkpoint.param_order(get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options))
            named = checkpoint.named_optimizer_state(optimizer_state, names)
            set_optimizer_state_dict(trainer.model, trainer.optimizer, named, options=options)
        else:
            checkpoint.load_weights(trainer.model, source, partial=adapter)
            trainer.optimizer.load_state_dict(optimizer_state)
        if trainer.ema is not None:
            trainer.ema.load_state_dict(checkpoint.load_ema(source))
        resume_schedule(trainer.scheduler, state["scheduler"])
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
