"""Where a run continues from (trainer.resume), and restoring every stateful part from that checkpoint:
weights, optimizer (whole tensors, whatever the strategy), schedule, grad scaler, weight average, RNG and data
sampler (lmtrain.checkpoint.parts)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint import meta as checkpoint_meta
from lmtrain.checkpoint.parts import TENSOR_PARTS, Parts, saved_states
from lmtrain.checkpoint.strategy import Strategy
from lmtrain.core import distributed
from lmtrain.core.errors import RunRefused, UserError
from lmtrain.core.safe_io import read_text_capped

log = logging.getLogger("lmtrain")
KEY = "trainer.resume"


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
    saved = checkpoint_meta.read_json(source / "tokenizer.json", KEY)
    if saved != json.loads(files["tokenizer.json"]):
        theirs = _data_keys(read_text_capped(source / "config.yaml", checkpoint_meta.MAX_JSON_BYTES, KEY))
        ours = _data_keys(files["config.yaml"])
        changed = [f"data.{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in ours if theirs.get(k) != ours[k]]
        raise RunRefused(
            f"{KEY}: the tokenizer in '{source}' differs from this run's"
            + (f" ({'; '.join(changed)})" if changed else "")
        )
    saved_model = checkpoint_meta.model_config(source, KEY).__dict__
    ours_model = json.loads(files["model.json"])
    changed = [f"{k} {saved_model.get(k)!r} there, {v!r} here" for k, v in ours_model.items() if saved_model[k] != v]
    if changed:
        raise RunRefused(f"{KEY}: the model shape in '{source}' differs from this run's config: {'; '.join(changed)}")


def restore(source: Path, parts: Parts, strategy: Strategy, files: dict[str, str], run_dir: Path) -> int:
    """Load every part's state from `source` (on every process; model and tokenizer must match this run's) and
    return the step it continues from. A checkpoint holds whole tensors, so any number of processes can resume
    it. The generators (the parts kept in rng.safetensors) are set last, so nothing loaded after them draws."""
    check_compatible(source, files)
    state = checkpoint_meta.trainer_state(source, KEY)
    adapter = (source / checkpoint.ADAPTER_FILE).is_file()  # holds the trained tensors only; the base is loaded already
    generators = [name for name in parts if TENSOR_PARTS.get(name, ("",))[0] == checkpoint.RNG_FILE]
    with checkpoint.readable(source, KEY):
        _same_optimizer(source, files["config.yaml"])
        strategy.scatter(source, parts, checkpoint.load_optimizer_state(source), partial=adapter)
        saved = saved_states(source, parts, state)
        for name, value in saved.items():
            if name not in generators:
                parts[name].load_state_dict(value)
    for name in generators:
        parts[name].load_state_dict(saved[name])
    step = int(state["trainer"]["step"])
    log.info("resumed from %s at step %d", source, step)
    root = run_dir / "checkpoints"
    if strategy.placement.is_main:
        for moved in checkpoint.set_aside_after(root, step):
            log.warning("set aside %s: it continued the run past the checkpoint resumed from", moved)
        if source.parent.resolve() == root.resolve():
            checkpoint.point_latest(root, source)  # a kill may have left `latest` one checkpoint behind
    distributed.barrier()
    return step


def _same_optimizer(source: Path, config_yaml: str) -> None:
    """An optimizer's state only loads into the same kind of optimizer."""
    if not (source / "config.yaml").is_file():
        return
    saved = (yaml.safe_load((source / "config.yaml").read_text()) or {}).get("optimizer", {}).get("name")
    wanted = (yaml.safe_load(config_yaml) or {}).get("optimizer", {}).get("name")
    if saved and wanted and saved != wanted:
        raise UserError(
            f"trainer.resume: '{source}' was trained with optimizer={saved}; resume it with optimizer={saved}, "
            "or start a new run from its weights (lmtrain finetune init_from=...)"
        )
