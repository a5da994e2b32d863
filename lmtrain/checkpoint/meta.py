"""A checkpoint's metadata read as untrusted input: model.json, tokenizer.json, trainer_state.json and the
safetensors headers are checked like a config (types, ranges, agreement with the tensor shapes the weights
file really holds) before anything is allocated. Each problem is a one-line UserError naming the file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import safetensors_shapes
from lmtrain.core.safe_io import read_text_capped
from lmtrain.data.tokenizer import plain_text
from lmtrain.model.transformer import TransformerConfig, TransformerLM

MAX_JSON_BYTES = 64 << 20  # a 250k-entry BPE tokenizer.json is ~20 MB
MAX_SIZE = 1 << 31  # no model dimension is larger

# model.json: field -> (type, check of the value, what the check wants)
_POSITIVE = (lambda v: 0 < v <= MAX_SIZE, f"in 1..{MAX_SIZE}")
_POSITIVE_OR_NULL = (lambda v: v is None or 0 < v <= MAX_SIZE, f"null or in 1..{MAX_SIZE}")
_POSITIVE_FLOAT = (lambda v: 0 < v < math.inf, "> 0")
_BOOL = (lambda v: True, "true or false")
NULLABLE = {"d_ff", "num_kv_heads", "head_dim", "logit_softcap"}
MODEL_FIELDS: dict[str, tuple[type, Any, str]] = {
    "vocab_size": (int, *_POSITIVE),
    "d_model": (int, *_POSITIVE),
    "num_heads": (int, *_POSITIVE),
    "num_layers": (int, *_POSITIVE),
    "max_seq_len": (int, *_POSITIVE),
    "num_kv_heads": (int, *_POSITIVE_OR_NULL),
    "head_dim": (int, *_POSITIVE_OR_NULL),
    "d_ff": (int, *_POSITIVE_OR_NULL),
    "dropout": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "activation": (
        str,
        lambda v: v in ("relu", "gelu", "gelu_tanh", "swiglu", "relu2"),
        "relu, gelu, gelu_tanh, swiglu or relu2",
    ),
    "norm": (str, lambda v: v in ("layernorm", "rmsnorm"), "layernorm or rmsnorm"),
    "norm_eps": (float, *_POSITIVE_FLOAT),
    "norm_position": (str, lambda v: v in ("pre", "post"), "pre or post"),
    "position": (str, lambda v: v in ("learned", "rope"), "learned or rope"),
    "rope_theta": (float, *_POSITIVE_FLOAT),
    "rope_scaling": (str, lambda v: v in ("none", "llama3"), "none or llama3"),
    "rope_scaling_factor": (float, *_POSITIVE_FLOAT),
    "rope_low_freq_factor": (float, *_POSITIVE_FLOAT),
    "rope_high_freq_factor": (float, *_POSITIVE_FLOAT),
    "rope_original_max_seq_len": (int, *_POSITIVE),
    "tie_embeddings": (bool, *_BOOL),
    "bias": (bool, *_BOOL),
    "qkv_bias": (bool, *_BOOL),
    "qk_norm": (bool, *_BOOL),
    "init_std": (float, *_POSITIVE_FLOAT),
    "zero_init_residual": (bool, *_BOOL),
    "logit_softcap": (float, lambda v: v is None or 0 < v < math.inf, "null or > 0"),
    "pooling": (str, lambda v: v in ("last", "mean"), "last or mean"),
    "num_classes": (int, lambda v: 0 <= v <= MAX_SIZE, f"in 0..{MAX_SIZE}"),
}
TRAINER_STATE_FIELDS = {"step": int, "tokens_seen": int, "window_steps": int}


def read_json(path: Path, key: str) -> Any:
    text = read_text_capped(path, MAX_JSON_BYTES, key)
    try:
        return json.loads(text)
    except ValueError as err:
        raise UserError(f"{key}: '{path}' is damaged (not JSON: {err})") from None


def _type_ok(name: str, value: Any, kind: type) -> bool:
    if value is None:
        return name in NULLABLE
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def as_model_config(values: dict[str, Any]) -> TransformerConfig:
    """model.json's fields, checked, as a TransformerConfig with its enums; a field an older model.json lacks
    (one added since) takes the schema's default, which is what such a model was."""
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TransformerConfig), values))
    assert isinstance(config, TransformerConfig)
    return config


def model_config(checkpoint: Path, key: str, exact: bool = True) -> TransformerConfig:
    """The checkpoint's TransformerConfig, checked field by field and against the tensor shapes in its
    model.safetensors (with `exact`, every tensor; else, for an export whose int8 layers have other shapes,
    the embedding and the number of blocks)."""
    weights = "model.safetensors"
    path = checkpoint / "model.json"
    values = read_json(path, key)
    if not isinstance(values, dict):
        raise UserError(f"{key}: '{path}' is damaged (not a JSON object)")
    unknown = sorted(set(values) - set(MODEL_FIELDS))
    if unknown or "vocab_size" not in values:
        problem = f"unknown field '{unknown[0]}'" if unknown else "no vocab_size"
        raise UserError(f"{key}: '{path}' is not an lmtrain model.json ({problem})")
    for name, value in values.items():
        kind, check, wanted = MODEL_FIELDS[name]
        if not _type_ok(name, value, kind) or not check(value):
            raise UserError(f"{key}: '{path}': {name} must be {wanted}, got {value!r}")
    config = as_model_config(values)
    if config.head_dim is None and config.d_model % config.num_heads:
        raise UserError(f"{key}: '{path}': num_heads={config.num_heads} does not divide d_model={config.d_model}")
    if config.num_heads % config.kv_heads:
        raise UserError(f"{key}: '{path}': num_kv_heads={config.kv_heads} does not divide num_heads={config.num_heads}")
    shapes = safetensors_shapes(checkpoint / weights, key)
    if (checkpoint / "adapter.json").is_file():  # the trained tensors only; loading checks their names
        return config
    if config.tie_embeddings:  # stored once, under either name
        shared = shapes.pop("lm_head.weight", None)
        if shared is not None:
            shapes.setdefault("token_embedding.weight", shared)
    blocks = {name.split(".")[1] for name in shapes if name.startswith("blocks.")}
    embedding = shapes.get("token_embedding.weight")
    if embedding != [config.vocab_size, config.d_model] or len(blocks) != config.num_layers:
        raise UserError(
            f"{key}: '{path}' does not match '{checkpoint / weights}' (embedding {embedding}, {len(blocks)} blocks; "
            f"model.json says [{config.vocab_size}, {config.d_model}], {config.num_layers} blocks)"
        )
    if exact:
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected = {k: list(v.shape) for k, v in TransformerLM(config).state_dict().items()}
        if config.tie_embeddings:
            expected.pop("lm_head.weight", None)
        wrong = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
        if wrong:
            raise UserError(
                f"{key}: '{path}' does not match '{checkpoint / weights}': tensor '{wrong[0]}' is "
                f"{shapes.get(wrong[0])} there, model.json implies {expected.get(wrong[0])}"
            )
    return config


def tokenizer(checkpoint: Path, key: str) -> Tokenizer:
    path = checkpoint / "tokenizer.json"
    text = read_text_capped(path, MAX_JSON_BYTES, key)
    try:
        return plain_text(Tokenizer.from_str(text))
    except Exception as err:  # the tokenizers library raises plain Exceptions
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{key}: '{path}' is damaged (not a tokenizer: {detail})") from None


def trainer_state(checkpoint: Path, key: str) -> dict:
    """trainer_state.json, its counters checked to be non-negative integers."""
    path = checkpoint / "trainer_state.json"
    state = read_json(path, key)
    counters = state.get("trainer") if isinstance(state, dict) else None
    if not isinstance(counters, dict) or not isinstance(state.get("scheduler"), dict):
        raise UserError(f"{key}: '{path}' is damaged (no trainer or scheduler state)")
    for name in TRAINER_STATE_FIELDS:
        value = counters.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{key}: '{path}': trainer.{name} must be a non-negative integer, got {value!r}")
    return state


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (a missing or torn file, headers that do not match), or None."""
    key = "checkpoint"
    try:
        model_config(checkpoint, key)
        trainer_state(checkpoint, key)
        read_json(checkpoint / "optimizer.json", key)
        for name in ("optimizer.safetensors", "rng.safetensors"):
            safetensors_shapes(checkpoint / name, key)
        read_text_capped(checkpoint / "tokenizer.json", MAX_JSON_BYTES, key)
    except UserError as err:
        return str(err).removeprefix(f"{key}: ")
    return None
