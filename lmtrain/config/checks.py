"""Validation before any compute: types against the schema, allowed choices, cross-field rules.

Every problem is reported at once, one line each, naming the key to fix (and the nearest valid name
for a misspelling).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmtrain.config.keys import CHOICES, all_keys, nearest
from lmtrain.config.schema import (
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    GradAccumConfig,
    InspectConfig,
    LossConfig,
    ModelConfig,
    PredictConfig,
    PretrainConfig,
    TaskConfig,
)
from lmtrain.config.trainer_checks import check_trainer
from lmtrain.core.errors import UserError


class ConfigError(UserError):
    """A config value or key that cannot work; raised before any compute."""


def _typed(schema: type, cfg: DictConfig, errors: list[str]) -> Any:
    """Merge `cfg` into `schema` group by group, so each group reports its own first type error."""
    merged = OmegaConf.structured(schema)
    known = all_keys(schema)
    for key in map(str, cfg.keys()):
        if key == "hydra":
            continue
        if key not in merged:
            hint = nearest(str(key), [k for k in known if "." not in k])
            errors.append(f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
            continue
        given, expected = cfg._get_node(key), merged._get_node(key)
        if isinstance(given, DictConfig | ListConfig) and not isinstance(expected, DictConfig | ListConfig):
            kind = "a dict" if isinstance(given, DictConfig) else "a list"
            errors.append(f"{key}: expected a single value, got {kind} ({OmegaConf.to_container(given)})")
            continue
        try:
            merged[key] = OmegaConf.merge(merged[key], cfg[key]) if isinstance(cfg[key], DictConfig) else cfg[key]
        except OmegaConfBaseException as err:
            errors.append(_describe(err, str(key), known))
    return merged


def _describe(err: OmegaConfBaseException, group: str, known: list[str]) -> str:
    full_key = getattr(err, "full_key", None) or group
    if not full_key.startswith(group):
        full_key = f"{group}.{full_key}"
    message = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in 'SourceConfig'" in message:  # a key inside a data.sources entry
        return f"data.sources: a source has no key '{full_key.rsplit('.', 1)[-1]}'; it takes path, weight and name"
    if "not in struct" in message:
        leaf = full_key.rsplit(".", 1)[-1]
        siblings = [k.rsplit(".", 1)[-1] for k in known if k.startswith(group + ".")]
        hint = nearest(leaf, siblings)
        return f"unknown key '{full_key}'" + (f" (did you mean '{group}.{hint}'?)" if hint else "")
    return f"{full_key}: {message}"


def _check_choices(cfg: DictConfig, errors: list[str]) -> DictConfig:
    """Report each value outside its key's choices (all of them at once, with the nearest valid one), and
    return the config without those keys, so the typed merge reports only the other problems."""
    bad = []
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, DictConfig | ListConfig) and str(value) not in options:
            hint = nearest(str(value), list(options))
            suggestion = f" (did you mean '{hint}'?)" if hint else ""
            errors.append(f"{key}: '{value}' is not one of {', '.join(options)}{suggestion}")
            bad.append(key)
    if not bad:
        return cfg
    kept = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    assert isinstance(kept, DictConfig)
    for key in bad:
        parent, _, leaf = key.rpartition(".")
        owner = OmegaConf.select(kept, parent) if parent else kept
        assert isinstance(owner, DictConfig)
        del owner[leaf]
    return kept


def _positive(obj: Any, prefix: str, errors: list[str], *keys: str, nullable: bool = False) -> None:
    """Each `obj.key` must be > 0 (or, with nullable, null)."""
    for key in keys:
        value = getattr(obj, key)
        if not (value is None and nullable) and (value is None or value <= 0):
            errors.append(f"{prefix}{key}: must be > 0{' or null' if nullable else ''}, got {value}")


def _need_ckpt(cfg: Any, errors: list[str], example: str = "outputs/<run>/checkpoints/latest") -> None:
    if not cfg.ckpt:
        errors.append(f"ckpt: missing; pass ckpt={example}")


def _check_model(m: ModelConfig, errors: list[str]) -> None:
    _positive(m, "model.", errors, "d_model", "num_heads", "num_layers", "max_seq_len", "rope_theta", "init_std")
    _positive(m, "model.", errors, "norm_eps", "rope_scaling_factor", "rope_original_max_seq_len")
    _positive(m, "model.", errors, "d_ff", "num_kv_heads", "head_dim", nullable=True)
    if m.num_heads > 0 and m.head_dim is None and m.d_model % m.num_heads:
        errors.append(
            f"model.num_heads: {m.num_heads} does not divide model.d_model={m.d_model} (or set model.head_dim)"
        )
    elif m.position == "rope" and m.num_heads > 0 and (m.head_dim or m.d_model // m.num_heads) % 2:
        errors.append(f"model.position=rope needs an even head size, got {m.head_dim or m.d_model // m.num_heads}")
    if m.num_kv_heads and m.num_heads > 0 and m.num_heads % m.num_kv_heads:
        errors.append(f"model.num_kv_heads: {m.num_kv_heads} does not divide model.num_heads={m.num_heads}")
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        errors.append("model.rope_low_freq_factor: must be > 0 and below model.rope_high_freq_factor")
    if not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    _positive(m, "model.", errors, "logit_softcap", nullable=True)


def _check_training(cfg: PretrainConfig | FinetuneConfig, errors: list[str]) -> None:
    """Optimizer, scheduler, accumulation, loss and trainer: the groups pretrain and finetune share."""
    t = cfg.trainer
    derived = isinstance(cfg, FinetuneConfig)  # finetune: null max_steps (no cap), eval_every and lr are derived
    _positive(t, "trainer.", errors, "max_steps", "eval_every", nullable=derived)
    _positive(cfg.optimizer, "optimizer.", errors, "lr", nullable=derived)
    _positive(
        t,
        "trainer.",
        errors,
        "eval_batches",
        "log_every",
        "checkpoint_every",
        "dist_timeout_s",
        "dist_join_timeout_s",
    )
    _check_optimization(cfg, errors)
    _check_loss(cfg.loss, errors)
    if t.nproc < 1:
        errors.append(f"trainer.nproc: must be >= 1, got {t.nproc}")
    if t.keep_last < 0:
        errors.append(f"trainer.keep_last: must be >= 0 (0 keeps all), got {t.keep_last}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        errors.append(f"trainer.ema_decay: must be in (0, 1) or null, got {t.ema_decay}")
    if t.ema_decay is not None and t.strategy == "fsdp":
        errors.append("trainer.ema_decay: not supported with trainer.strategy=fsdp (use ddp, or ema_decay=null)")
    _positive(t, "trainer.", errors, "early_stopping_patience", nullable=True)
    if not isinstance(t.resume, bool | str):
        errors.append(f"trainer.resume: must be true, false or a path, got {t.resume!r}")


def _check_optimization(cfg: PretrainConfig | FinetuneConfig, errors: list[str]) -> None:
    """The optimizer, its learning-rate schedule and gradient accumulation."""
    o, s, g = cfg.optimizer, cfg.scheduler, cfg.grad_accum
    _positive(g, "grad_accum.", errors, "steps")
    _positive(o, "optimizer.", errors, "eps", "muon_lr")
    if not 0.0 <= o.momentum < 1.0:
        errors.append(f"optimizer.momentum: must be in [0, 1), got {o.momentum}")
    if o.weight_decay < 0:
        errors.append(f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(f"optimizer.betas: must be two numbers in [0, 1), got {list(o.betas)}")
    if o.grad_clip < 0:
        errors.append(f"optimizer.grad_clip: must be >= 0 (0 disables), got {o.grad_clip}")
    if s.warmup_steps < 0:
        errors.append(f"scheduler.warmup_steps: must be >= 0, got {s.warmup_steps}")
    if o.lr is not None and o.lr > 0 and not 0 <= s.min_lr <= o.lr:
        errors.append(f"scheduler.min_lr: must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")
    if not 0.0 < s.decay_fraction <= 1.0:
        errors.append(f"scheduler.decay_fraction: must be in (0, 1], got {s.decay_fraction}")
    if g.mode == "global_batch" and (g.global_batch_tokens is None or g.global_batch_tokens <= 0):
        errors.append(
            "grad_accum.global_batch_tokens: must be a positive number of tokens with grad_accum=global_batch"
        )


def _check_loss(lo: LossConfig, errors: list[str]) -> None:
    if not 0.0 <= lo.label_smoothing < 1.0:
        errors.append(f"loss.label_smoothing: must be in [0, 1), got {lo.label_smoothing}")
    if lo.z_loss < 0:
        errors.append(f"loss.z_loss: must be >= 0, got {lo.z_loss}")
    _positive(lo, "loss.", errors, "temperature")
    if not 0.0 <= lo.alpha <= 1.0:
        errors.append(f"loss.alpha: must be in [0, 1], got {lo.alpha}")


def _check_pretrain(cfg: PretrainConfig, errors: list[str]) -> None:
    _check_model(cfg.model, errors)
    _check_training(cfg, errors)
    check_trainer(cfg, errors)
    d = cfg.data
    _positive(d, "data.", errors, "max_chars", "tokenizer_sample_chars", "num_workers", nullable=True)
    _positive(d, "data.", errors, "shard_tokens")
    for number, source in enumerate(d.sources):
        if not source.weight > 0:
            errors.append(f"data.sources[{number}].weight: must be > 0, got {source.weight} (drop the source instead)")
    if d.streaming and (d.sources or d.window != "random" or d.validation):
        errors.append(
            "data.streaming: reads one stream of train; it takes no data.sources, data.validation or data.window"
        )
    if not 0.0 < d.val_fraction < 1.0:
        errors.append(f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    if d.tokenizer == "bpe" and d.vocab_size < 257:
        errors.append(f"data.vocab_size: a byte-level BPE needs at least 257 entries, got {d.vocab_size}")
    if not errors and cfg.grad_accum.mode == "global_batch" and cfg.trainer.micro_batch_size != "auto":
        try:
            accumulation_steps(cfg.grad_accum, cfg.trainer.micro_batch_size, cfg.model.max_seq_len, 1)
        except ConfigError as err:
            errors.append(str(err))


def _check_finetune(cfg: FinetuneConfig, errors: list[str]) -> None:
    _check_training(cfg, errors)
    check_trainer(cfg, errors)
    if not cfg.init_from:
        errors.append("init_from: missing; pass init_from=outputs/<pretrain-run>/checkpoints/latest")
    if not cfg.data.train:
        errors.append("data.train: missing; pass data.train=path/to/train.jsonl")
    if cfg.evals_per_epoch is None and cfg.trainer.eval_every is None:
        errors.append("evals_per_epoch: null needs trainer.eval_every (validate every N steps)")
    _positive(cfg, "", errors, "epochs", nullable=True)
    _positive(cfg, "", errors, "evals_per_epoch", nullable=True)
    _positive(cfg.data, "data.", errors, "pack_len", nullable=True)
    a = cfg.adapter
    _positive(a, "adapter.", errors, "rank", "alpha")
    if not 0.0 <= a.dropout < 1.0:
        errors.append(f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    known = ("qkv", "proj", "up", "gate", "down", "attention", "mlp", "all_linear")
    for target in a.target_modules:
        if target not in known:
            hint = nearest(str(target), list(known))
            errors.append(
                f"adapter.target_modules: '{target}' is not one of {', '.join(known)}"
                + (f" (did you mean '{hint}'?)" if hint else "")
            )
    if cfg.freeze_blocks < 0:
        errors.append(f"freeze_blocks: must be >= 0, got {cfg.freeze_blocks}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        errors.append(f"data.val_fraction: must be in (0, 1), got {cfg.data.val_fraction}")
    _check_task(cfg.task, "task.", errors)
    if cfg.grad_accum.mode == "global_batch":
        errors.append("grad_accum=global_batch counts tokens of packed text: finetune with grad_accum=steps")


def _check_task(task: TaskConfig, prefix: str, errors: list[str]) -> None:
    _positive(task, prefix, errors, "num_beams", "max_new_tokens", "temperature")
    _positive(task, prefix, errors, "top_k", "max_eval_examples", nullable=True)


def _check_generate(cfg: GenerateConfig, errors: list[str]) -> None:
    _need_ckpt(cfg, errors)
    _positive(cfg, "", errors, "num_samples")
    _positive(cfg, "", errors, "max_new_tokens", nullable=True)
    if cfg.top_k is not None and cfg.top_k < 0:
        errors.append(f"top_k: must be >= 0 (0 keeps all tokens), got {cfg.top_k}")
    if cfg.temperature is not None and cfg.temperature < 0:
        errors.append(f"temperature: must be >= 0, got {cfg.temperature}")
    if cfg.top_p is not None and not 0.0 < cfg.top_p <= 1.0:
        errors.append(f"top_p: must be in (0, 1], got {cfg.top_p}")


def _check_evaluate(cfg: EvaluateConfig, errors: list[str]) -> None:
    _need_ckpt(cfg, errors)
    _positive(cfg, "", errors, "batch_size")
    _positive(cfg.suite, "suite.", errors, "batch_size")
    _positive(cfg.suite, "suite.", errors, "limit", nullable=True)
    if cfg.suite.num_fewshot is not None and cfg.suite.num_fewshot < 0:
        errors.append(f"suite.num_fewshot: must be >= 0, got {cfg.suite.num_fewshot}")
    _positive(cfg, "", errors, "num_beams", "max_new_tokens", "max_examples", nullable=True)


def _check_predict(cfg: PredictConfig, errors: list[str]) -> None:
    _need_ckpt(cfg, errors, "outputs/<finetune-run>/checkpoints/best")
    if (cfg.text is None) == (cfg.input is None):
        errors.append('text / input: give exactly one: text="a line to classify" or input=path/to/file')
    _positive(cfg, "", errors, "batch_size")


def _check_export(cfg: ExportConfig, errors: list[str]) -> None:
    _need_ckpt(cfg, errors)
    _positive(cfg, "", errors, "eval_batches", "max_shard_mb")
    if cfg.format == "hf" and cfg.quantize != "none":
        errors.append("quantize: format=hf writes plain weights; drop quantize=int8 or use format=lmtrain")


INSPECT_VIEWS = ("loss", "attention", "logit_lens", "contribution")


def _check_inspect(cfg: InspectConfig, errors: list[str]) -> None:
    _need_ckpt(cfg, errors)
    if (cfg.text is None) == (cfg.text_file is None):
        errors.append('text / text_file: give exactly one: text="To be, or not to be" or text_file=path/to/file.txt')
    for view in cfg.views or []:
        if view not in INSPECT_VIEWS:
            hint = nearest(str(view), list(INSPECT_VIEWS))
            errors.append(
                f"views: '{view}' is not one of {', '.join(INSPECT_VIEWS)}"
                + (f" (did you mean '{hint}'?)" if hint else "")
            )
    if cfg.views is not None and not cfg.views:
        errors.append(f"views: empty; choose from {', '.join(INSPECT_VIEWS)} (or null for all)")
    for key in ("layers", "heads"):
        negative = [i for i in getattr(cfg, key) or [] if i < 0]
        if negative:
            errors.append(f"{key}: indices count from 0, got {negative[0]}")


CHECKS: dict[type, Callable[[Any, list[str]], None]] = {
    InspectConfig: _check_inspect,
    ExportConfig: _check_export,
    PretrainConfig: _check_pretrain,
    FinetuneConfig: _check_finetune,
    GenerateConfig: _check_generate,
    EvaluateConfig: _check_evaluate,
    PredictConfig: _check_predict,
}


def accumulation_steps(grad_accum: GradAccumConfig, micro_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each process."""
    if grad_accum.mode == "steps":
        return grad_accum.steps
    tokens_per_round = micro_batch_size * seq_len * world_size
    steps, rest = divmod(grad_accum.global_batch_tokens or 0, tokens_per_round)
    if rest or steps == 0:
        raise ConfigError(
            f"grad_accum.global_batch_tokens: {grad_accum.global_batch_tokens} is not a positive multiple of "
            f"trainer.micro_batch_size × model.max_seq_len × processes = {tokens_per_round}"
        )
    return steps


def _check_warmup(cfg: Any, errors: list[str]) -> None:
    """A warmup given explicitly that outlasts the run is an error; a default one is shortened to fit when
    the trainer is built (lmtrain.train.build.build_trainer), with a warning."""
    cap = cfg.trainer.max_steps  # pretrain's length, finetune's cap
    if cap is not None and cfg.scheduler.warmup_steps > cap > 0:
        errors.append(
            f"scheduler.warmup_steps: {cfg.scheduler.warmup_steps} exceeds trainer.max_steps={cfg.trainer.max_steps}"
        )


def _eval_every_given(cfg: FinetuneConfig, evals_per_epoch_given: bool, errors: list[str]) -> None:
    """finetune: a trainer.eval_every given on the command line sets the interval, not evals_per_epoch."""
    if evals_per_epoch_given and cfg.evals_per_epoch is not None:
        errors.append("trainer.eval_every: evals_per_epoch is set too; give one of them (or evals_per_epoch=null)")
    cfg.evals_per_epoch = None


def validate(cfg: DictConfig, schema: type, explicit: Collection[str] = ()) -> Any:
    """Type-check `cfg` against `schema` and run the cross-field checks; returns the dataclass object.
    `explicit`: the keys the user set on the command line (a few checks apply to those only).

    Raises ConfigError listing every problem found, one per line.
    """
    errors: list[str] = []
    merged = _typed(schema, _check_choices(cfg, errors), errors)
    if not errors:
        try:
            obj = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, "", all_keys(schema))) from None
        CHECKS[schema](obj, errors)
        if "scheduler.warmup_steps" in explicit:
            _check_warmup(obj, errors)
        if isinstance(obj, FinetuneConfig) and "trainer.eval_every" in explicit:
            _eval_every_given(obj, "evals_per_epoch" in explicit, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return obj
