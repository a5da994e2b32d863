"""Typed schemas for every config group, and the checks that run before any compute.

Only this module and `commands/` touch OmegaConf. Importing it must not import torch: `--help`,
`--cfg job` and config errors answer in well under a second.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmtrain.errors import UserError


class ConfigError(UserError):
    """A config value or key that cannot work; raised before any compute."""


@dataclass
class ModelConfig:
    d_model: int = 128  # width of the residual stream
    num_heads: int = 4  # attention heads; must divide d_model
    num_layers: int = 4  # Transformer blocks
    max_seq_len: int = 128  # context length in tokens
    d_ff: int | None = None  # FFN hidden width; null: 4*d_model (8/3*d_model for swiglu)
    dropout: float = 0.0  # embedding, attention and residual dropout
    activation: str = "gelu"  # relu | gelu | swiglu
    norm_position: str = "pre"  # pre | post
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = True  # share the token embedding with the LM head
    bias: bool = False  # biases in linear layers and LayerNorms
    init_std: float = 0.02  # std of the normal init; residual projections are scaled by 1/sqrt(2*num_layers)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only, never to norms, biases or embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam(W) betas
    eps: float = 1e-8  # Adam(W) epsilon
    momentum: float = 0.9  # SGD momentum
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant | inverse_sqrt | wsd
    warmup_steps: int = 100  # linear warmup from 0 to optimizer.lr
    min_lr: float = 0.0  # floor the schedule never goes below
    decay_fraction: float = 0.2  # wsd only: fraction of max_steps spent in the final decay


@dataclass
class GradAccumConfig:
    mode: str = "steps"  # steps | global_batch
    steps: int = 1  # micro-batches per optimizer step (mode=steps)
    global_batch_tokens: int | None = None  # tokens per optimizer step over all processes (mode=global_batch)


@dataclass
class LossConfig:
    name: str = "cross_entropy"  # cross_entropy
    label_smoothing: float = 0.0  # mass spread uniformly over the vocabulary
    z_loss: float = 0.0  # weight of the squared log-partition penalty (PaLM); 0 disables
    ignore_index: int = -100  # target id that carries no loss (padding, prompt tokens)


@dataclass
class DataConfig:
    train: str = "python-stdlib"  # file, folder, `datasets` name, or python-stdlib (embedded)
    validation: str | None = None  # held-out file; null: the last val_fraction of train
    val_fraction: float = 0.1  # share of train tokens held out when validation is null
    text_field: str = "text"  # column holding the text in jsonl/csv/parquet
    tokenizer: str = "bpe"  # char | byte | bpe
    vocab_size: int = 4096  # bpe only: size of the trained vocabulary
    max_chars: int | None = None  # read at most this many characters of train (null: all)
    cache_dir: str = "~/.cache/lmtrain"  # where packed token files are cached


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 16  # sequences per forward pass
    eval_every: int = 200  # validate every N steps (and at the end)
    eval_batches: int = 20  # micro-batches of fixed validation windows per evaluation
    log_every: int = 10  # write a metrics.jsonl record every N steps
    checkpoint_every: int = 500  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # keep this many step checkpoints; 0 keeps all
    seed: int = 1337  # seeds init, dropout and data order
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model
    resume: Any = False  # false | true (this run dir's latest) | path to a checkpoint or run dir
    progress_bar: bool = True  # tqdm bar on a terminal
    tensorboard: bool = False  # also log scalars to <run dir>/tensorboard (needs the tensorboard package)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_accum: GradAccumConfig = field(default_factory=GradAccumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class GenerateConfig:
    ckpt: str | None = None  # checkpoint dir (or run dir) to load
    prompt: str = ""  # text to continue
    prompt_file: str | None = None  # read the prompt from this file instead
    max_new_tokens: int = 200  # tokens to sample
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = 50  # keep the k most likely tokens (null: all)
    top_p: float | None = None  # nucleus sampling mass (null: off)
    num_samples: int = 1  # independent samples
    seed: int = 1337  # sampling seed
    device: str = "auto"  # auto | cpu | cuda


CHOICES = {
    "model.activation": ("relu", "gelu", "swiglu"),
    "model.norm_position": ("pre", "post"),
    "model.position": ("learned", "rope"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "scheduler.name": ("cosine", "linear", "constant", "inverse_sqrt", "wsd"),
    "grad_accum.mode": ("steps", "global_batch"),
    "loss.name": ("cross_entropy",),
    "data.tokenizer": ("char", "byte", "bpe"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
}


def nearest(name: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf and node in a config or dataclass schema."""
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    keys = []
    for key in node.keys():
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(all_keys(child, path + "."))
    return keys


def _typed(schema: type, cfg: DictConfig, errors: list[str]) -> Any:
    """Merge `cfg` into `schema` group by group, so each group reports its own first type error."""
    merged = OmegaConf.structured(schema)
    known = all_keys(schema)
    for key in cfg.keys():
        if key == "hydra":
            continue
        if key not in merged:
            hint = nearest(str(key), [k for k in known if "." not in k])
            errors.append(f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
            continue
        try:
            merged[key] = (
                OmegaConf.merge(merged[key], cfg[key]) if isinstance(cfg[key], DictConfig) else cfg[key]
            )
        except OmegaConfBaseException as err:
            errors.append(_describe(err, str(key), known))
    return merged


def _describe(err: OmegaConfBaseException, group: str, known: list[str]) -> str:
    full_key = getattr(err, "full_key", None) or group
    if not full_key.startswith(group):
        full_key = f"{group}.{full_key}"
    message = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in struct" in message:
        leaf = full_key.rsplit(".", 1)[-1]
        siblings = [k.rsplit(".", 1)[-1] for k in known if k.startswith(group + ".")]
        hint = nearest(leaf, siblings)
        return f"unknown key '{full_key}'" + (f" (did you mean '{group}.{hint}'?)" if hint else "")
    return f"{full_key}: {message}"


def _check_choices(cfg: DictConfig, errors: list[str]) -> None:
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in options:
            hint = nearest(str(value), list(options))
            suggestion = f" (did you mean '{hint}'?)" if hint else ""
            errors.append(f"{key}: '{value}' is not one of {', '.join(options)}{suggestion}")


def _check_pretrain(cfg: PretrainConfig, errors: list[str]) -> None:
    m, o, s, g, t, d, lo = (
        cfg.model,
        cfg.optimizer,
        cfg.scheduler,
        cfg.grad_accum,
        cfg.trainer,
        cfg.data,
        cfg.loss,
    )
    positive = {
        "model.d_model": m.d_model,
        "model.num_heads": m.num_heads,
        "model.num_layers": m.num_layers,
        "model.max_seq_len": m.max_seq_len,
        "trainer.max_steps": t.max_steps,
        "trainer.micro_batch_size": t.micro_batch_size,
        "trainer.eval_every": t.eval_every,
        "trainer.eval_batches": t.eval_batches,
        "trainer.log_every": t.log_every,
        "trainer.checkpoint_every": t.checkpoint_every,
        "grad_accum.steps": g.steps,
        "optimizer.lr": o.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            errors.append(f"{key}: must be > 0, got {value}")
    if m.num_heads > 0 and m.d_model % m.num_heads:
        errors.append(f"model.num_heads: {m.num_heads} does not divide model.d_model={m.d_model}")
    elif m.position == "rope" and m.num_heads > 0 and (m.d_model // m.num_heads) % 2:
        errors.append(
            f"model.position=rope needs an even head size, got d_model/num_heads={m.d_model // m.num_heads}"
        )
    if m.rope_theta <= 0 or m.init_std <= 0:
        errors.append("model.rope_theta and model.init_std: must be > 0")
    if o.eps <= 0:
        errors.append(f"optimizer.eps: must be > 0, got {o.eps}")
    if not 0.0 <= o.momentum < 1.0:
        errors.append(f"optimizer.momentum: must be in [0, 1), got {o.momentum}")
    if d.max_chars is not None and d.max_chars <= 0:
        errors.append(f"data.max_chars: must be > 0 or null (all), got {d.max_chars}")
    if m.d_ff is not None and m.d_ff <= 0:
        errors.append(f"model.d_ff: must be > 0 or null, got {m.d_ff}")
    if not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if o.weight_decay < 0:
        errors.append(f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        errors.append(f"optimizer.betas: must be two numbers in [0, 1), got {list(o.betas)}")
    if o.grad_clip < 0:
        errors.append(f"optimizer.grad_clip: must be >= 0 (0 disables), got {o.grad_clip}")
    if s.warmup_steps < 0:
        errors.append(f"scheduler.warmup_steps: must be >= 0, got {s.warmup_steps}")
    if s.warmup_steps > t.max_steps > 0:
        errors.append(f"scheduler.warmup_steps: {s.warmup_steps} exceeds trainer.max_steps={t.max_steps}")
    if o.lr > 0 and not 0 <= s.min_lr <= o.lr:
        errors.append(f"scheduler.min_lr: must be in [0, optimizer.lr={o.lr}], got {s.min_lr}")
    if not 0.0 < s.decay_fraction <= 1.0:
        errors.append(f"scheduler.decay_fraction: must be in (0, 1], got {s.decay_fraction}")
    if g.mode == "global_batch" and (g.global_batch_tokens is None or g.global_batch_tokens <= 0):
        errors.append(
            "grad_accum.global_batch_tokens: must be a positive number of tokens with grad_accum=global_batch"
        )
    if not 0.0 <= lo.label_smoothing < 1.0:
        errors.append(f"loss.label_smoothing: must be in [0, 1), got {lo.label_smoothing}")
    if lo.z_loss < 0:
        errors.append(f"loss.z_loss: must be >= 0, got {lo.z_loss}")
    if not 0.0 < d.val_fraction < 1.0:
        errors.append(f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    if d.tokenizer == "bpe" and d.vocab_size < 257:
        errors.append(f"data.vocab_size: a byte-level BPE needs at least 257 entries, got {d.vocab_size}")
    if t.keep_last < 0:
        errors.append(f"trainer.keep_last: must be >= 0 (0 keeps all), got {t.keep_last}")
    if not isinstance(t.resume, bool | str):
        errors.append(f"trainer.resume: must be true, false or a path, got {t.resume!r}")


def accumulation_steps(
    grad_accum: GradAccumConfig, micro_batch_size: int, seq_len: int, world_size: int
) -> int:
    """Micro-batches per optimizer step on each process."""
    if grad_accum.mode == "steps":
        return grad_accum.steps
    tokens_per_round = micro_batch_size * seq_len * world_size
    steps, rest = divmod(grad_accum.global_batch_tokens, tokens_per_round)
    if rest or steps == 0:
        raise ConfigError(
            f"grad_accum.global_batch_tokens: {grad_accum.global_batch_tokens} is not a positive multiple of "
            f"trainer.micro_batch_size × model.max_seq_len × processes = {tokens_per_round}"
        )
    return steps


def validate(cfg: DictConfig, schema: type) -> Any:
    """Type-check `cfg` against `schema` and run the cross-field checks; returns the dataclass object.

    Raises ConfigError listing every problem found, one per line.
    """
    errors: list[str] = []
    merged = _typed(schema, cfg, errors)
    _check_choices(merged, errors)
    if not errors:
        try:
            obj = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, "", all_keys(schema))) from None
        if schema is PretrainConfig:
            _check_pretrain(obj, errors)
            if not errors and obj.grad_accum.mode == "global_batch":
                try:
                    accumulation_steps(obj.grad_accum, obj.trainer.micro_batch_size, obj.model.max_seq_len, 1)
                except ConfigError as err:
                    errors.append(str(err))
        elif schema is GenerateConfig:
            if not obj.ckpt:
                errors.append("ckpt: missing; pass ckpt=outputs/<run>/checkpoints/latest")
            if obj.num_samples <= 0:
                errors.append(f"num_samples: must be > 0, got {obj.num_samples}")
            if obj.top_k is not None and obj.top_k <= 0:
                errors.append(f"top_k: must be > 0 or null (all tokens), got {obj.top_k}")
            if obj.max_new_tokens <= 0:
                errors.append(f"max_new_tokens: must be > 0, got {obj.max_new_tokens}")
            if obj.temperature < 0:
                errors.append(f"temperature: must be >= 0, got {obj.temperature}")
            if obj.top_p is not None and not 0.0 < obj.top_p <= 1.0:
                errors.append(f"top_p: must be in (0, 1], got {obj.top_p}")
    if errors:
        raise ConfigError("\n".join(errors))
    return obj
