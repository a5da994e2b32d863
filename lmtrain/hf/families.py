"""The Hugging Face model families lmtrain reads and writes: their config.json keys and weight names, mapped
to lmtrain's own `TransformerConfig` and parameter names. Both directions use these tables; the model itself
keeps one set of names.

Weight names follow `transformers`' GPT2LMHeadModel (Conv1D weights stored [in, out]) and
LlamaForCausalLM (Mistral, Qwen2 and Qwen3 share its layout; Qwen3 adds q_norm/k_norm).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from lmtrain.config.choices import Activation, Norm, Position, RopeScaling
from lmtrain.core.errors import UserError
from lmtrain.model.transformer import TransformerConfig

log = logging.getLogger("lmtrain")
MAX_SIZE = 1 << 31  # no model dimension is larger (the bound model.json is checked by)
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True)
class Source:
    """Where one lmtrain parameter lives in a Hugging Face state dict: one tensor, or several concatenated
    along dim 0 (q, k, v), optionally stored transposed (GPT-2's Conv1D)."""

    names: tuple[str, ...]
    transposed: bool = False


_GPT2_RULES = [
    (r"token_embedding\.weight", ("wte.weight",), False),
    (r"position_embedding\.weight", ("wpe.weight",), False),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", ("h.{0}.ln_1.{1}",), False),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", ("h.{0}.ln_2.{1}",), False),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", ("h.{0}.attn.c_attn.weight",), True),
    (r"blocks\.(\d+)\.attn\.qkv\.bias", ("h.{0}.attn.c_attn.bias",), False),
    (r"blocks\.(\d+)\.attn\.proj\.weight", ("h.{0}.attn.c_proj.weight",), True),
    (r"blocks\.(\d+)\.attn\.proj\.bias", ("h.{0}.attn.c_proj.bias",), False),
    (r"blocks\.(\d+)\.ffn\.up\.weight", ("h.{0}.mlp.c_fc.weight",), True),
    (r"blocks\.(\d+)\.ffn\.up\.bias", ("h.{0}.mlp.c_fc.bias",), False),
    (r"blocks\.(\d+)\.ffn\.down\.weight", ("h.{0}.mlp.c_proj.weight",), True),
    (r"blocks\.(\d+)\.ffn\.down\.bias", ("h.{0}.mlp.c_proj.bias",), False),
    (r"final_norm\.(weight|bias)", ("ln_f.{0}",), False),
]
_LLAMA_RULES = [
    (r"token_embedding\.weight", ("model.embed_tokens.weight",), False),
    (r"blocks\.(\d+)\.norm1\.weight", ("model.layers.{0}.input_layernorm.weight",), False),
    (r"blocks\.(\d+)\.norm2\.weight", ("model.layers.{0}.post_attention_layernorm.weight",), False),
    (
        r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
        tuple(f"model.layers.{{0}}.self_attn.{p}_proj.{{1}}" for p in "qkv"),
        False,
    ),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", ("model.layers.{0}.self_attn.o_proj.{1}",), False),
    (r"blocks\.(\d+)\.attn\.(q|k)_norm\.weight", ("model.layers.{0}.self_attn.{1}_norm.weight",), False),
    (r"blocks\.(\d+)\.ffn\.(gate|up|down)\.(weight|bias)", ("model.layers.{0}.mlp.{1}_proj.{2}",), False),
    (r"final_norm\.weight", ("model.norm.weight",), False),
]
_HEAD_RULE = (r"lm_head\.weight", ("lm_head.weight",), False)
# Buffers some checkpoints carry that are derived from the config, not weights.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def source(family: str, name: str) -> Source:
    """The Hugging Face tensor(s) holding lmtrain parameter `name` (GPT-2 names without `transformer.`)."""
    rules = (_GPT2_RULES if family == "gpt2" else _LLAMA_RULES) + [_HEAD_RULE]
    for pattern, names, transposed in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return Source(tuple(n.format(*match.groups()) for n in names), transposed)
    raise KeyError(f"no Hugging Face name for parameter {name!r} in family {family!r}")


def _rope_settings(hf: dict) -> dict:
    """RoPE base and scaling from config.json: `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (earlier versions)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = _positive({"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}, "rope_theta")
    settings: dict = {"rope_theta": theta}
    if kind == "llama3":
        settings.update(
            rope_scaling=RopeScaling.llama3,
            rope_scaling_factor=_positive(params, "factor"),
            rope_low_freq_factor=_positive(params, "low_freq_factor"),
            rope_high_freq_factor=_positive(params, "high_freq_factor"),
            rope_original_max_seq_len=_size(params, "original_max_position_embeddings"),
        )
    elif kind != "default":
        raise UserError(f"config.json: rope scaling '{kind}' is not supported (supported: default, llama3)")
    return settings


def _context_length(hf: dict, family: str) -> int:
    """max_position_embeddings, capped at the sliding window where one applies: lmtrain attends to the whole
    context, which equals sliding-window attention exactly as long as the context fits in the window."""
    length = _size(hf, "max_position_embeddings")
    window = _size(hf, "sliding_window") if hf.get("sliding_window") is not None else None
    layer_types = hf.get("layer_types") or []
    sliding = (
        family == "mistral"
        or bool(hf.get("use_sliding_window"))
        or any(kind == "sliding_attention" for kind in layer_types)
    )
    if sliding and window and window < length:
        log.warning(
            "config.json: sliding_window=%d is shorter than max_position_embeddings=%d; lmtrain uses full "
            "attention, so the context is capped at %d tokens (exact within it)",
            window,
            length,
            window,
        )
        return window
    return length


def _size(hf: dict, key: str, default: int | None = None) -> int:
    """config.json's `key`: an integer in 1..MAX_SIZE (KeyError when missing without a default)."""
    value = hf[key] if default is None else hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE:
        raise UserError(f"config.json: {key} must be an integer in 1..{MAX_SIZE}, got {value!r}")
    return value


def _positive(hf: dict, key: str, default: float | None = None) -> float:
    """config.json's `key`: a finite number > 0 (KeyError when missing without a default)."""
    value = hf[key] if default is None else hf.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
        raise UserError(f"config.json: {key} must be a number > 0, got {value!r}")
    return float(value)


def _need(hf: dict, key: str, expected, why: str) -> None:
    value = hf.get(key, expected)
    if value != expected:
        raise UserError(f"config.json: {key}={value!r} is not supported ({why})")


def config_from_hf(hf: dict) -> TransformerConfig:
    """lmtrain's config for a Hugging Face config.json. Raises UserError for a family or an option lmtrain
    does not implement, naming the key."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"config.json: model_type '{family}' is not supported (supported: {', '.join(FAMILIES)})")
    try:
        config = _gpt2_config(hf) if family == "gpt2" else _llama_config(hf, family)
    except KeyError as err:
        raise UserError(f"config.json: missing key {err} for model_type '{family}'") from None
    except (TypeError, ValueError) as err:  # a value of the wrong type: untrusted input, one line
        raise UserError(f"config.json: a value has the wrong type ({err})") from None
    if config.num_heads % config.kv_heads or (config.head_dim is None and config.d_model % config.num_heads):
        raise UserError(
            f"config.json: {config.num_heads} attention heads do not split into {config.kv_heads} key/value heads "
            f"of a {config.d_model}-wide model"
        )
    return config


def _gpt2_config(hf: dict) -> TransformerConfig:
    activations = {
        "gelu_new": Activation.gelu_tanh,
        "gelu_pytorch_tanh": Activation.gelu_tanh,
        "gelu": Activation.gelu,
        "relu": Activation.relu,
    }
    act = hf.get("activation_function", "gelu_new")
    if act not in activations:
        raise UserError(f"config.json: activation_function '{act}' is not supported ({', '.join(activations)})")
    _need(hf, "scale_attn_weights", True, "attention is scaled by 1/sqrt(head size)")
    _need(hf, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling")
    _need(hf, "add_cross_attention", False, "decoder-only")
    return TransformerConfig(
        vocab_size=_size(hf, "vocab_size"),
        d_model=_size(hf, "n_embd"),
        num_heads=_size(hf, "n_head"),
        num_layers=_size(hf, "n_layer"),
        max_seq_len=_size(hf, "n_positions"),
        d_ff=_size(hf, "n_inner") if hf.get("n_inner") is not None else None,
        activation=activations[act],
        norm=Norm.layernorm,
        norm_eps=_positive(hf, "layer_norm_epsilon", 1e-5),
        position=Position.learned,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bias=True,
        init_std=_positive(hf, "initializer_range", 0.02),
    )


def _llama_config(hf: dict, family: str) -> TransformerConfig:
    _need(hf, "hidden_act", "silu", "the FFN is SwiGLU")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise UserError(
            f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
            "(lmtrain puts biases on every linear layer or on none)"
        )
    if hf.get("pretraining_tp", 1) != 1:
        log.info("config.json: pretraining_tp=%s only changes how the reference splits matmuls", hf["pretraining_tp"])
    heads = _size(hf, "num_attention_heads")
    d_model = _size(hf, "hidden_size")
    if hf.get("head_dim") is None and d_model % heads:
        raise UserError(f"config.json: num_attention_heads={heads} does not divide hidden_size={d_model}")
    return TransformerConfig(
        vocab_size=_size(hf, "vocab_size"),
        d_model=d_model,
        num_heads=heads,
        num_layers=_size(hf, "num_hidden_layers"),
        max_seq_len=_context_length(hf, family),
        num_kv_heads=_size(hf, "num_key_value_heads") if hf.get("num_key_value_heads") else heads,
        head_dim=_size(hf, "head_dim") if hf.get("head_dim") is not None else d_model // heads,
        d_ff=_size(hf, "intermediate_size"),
        activation=Activation.swiglu,
        norm=Norm.rmsnorm,
        norm_eps=_positive(hf, "rms_norm_eps", 1e-6),
        position=Position.rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=attention_bias,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        init_std=_positive(hf, "initializer_range", 0.02),
        **_rope_settings(hf),
    )


def family_of(config: TransformerConfig) -> str:
    """The Hugging Face family that expresses `config` exactly; UserError naming what none can express.
    A model without biases fits GPT-2 too: its biases are written as zeros."""
    c = config
    problems = []
    if c.num_classes:
        problems.append("a classification head (export the language model, or use lmtrain's own export)")
    if c.norm_position != "pre":
        problems.append("post-norm blocks (every supported family is pre-norm)")
    if c.activation == "relu2":
        problems.append("activation=relu2 (no supported family uses squared ReLU)")
    if c.logit_softcap is not None:
        problems.append("logit_softcap (no supported family caps its logits)")
    if c.position == "learned":
        wanted = {"norm": "layernorm", "rope_scaling": "none", "qkv_bias": False, "qk_norm": False}
        problems += [f"{k}={getattr(c, k)} with learned positions" for k, v in wanted.items() if getattr(c, k) != v]
        if c.activation == "swiglu":
            problems.append("a SwiGLU FFN with learned positions")
        if c.kv_heads != c.num_heads or c.head_size * c.num_heads != c.d_model:
            problems.append("grouped-query attention or a separate head_dim with learned positions")
        family = "gpt2"
    else:
        if c.norm != "rmsnorm":
            problems.append(f"norm={c.norm} with RoPE (Llama-style families use rmsnorm)")
        if c.activation not in ("swiglu", "relu2"):  # relu2 is named above
            problems.append(f"activation={c.activation} with RoPE (Llama-style families use swiglu)")
        if c.qkv_bias and c.qk_norm:
            problems.append("qkv_bias together with qk_norm")
        family = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias and not c.bias else "llama"
    if problems:
        raise UserError(f"ckpt: no Hugging Face family can express this model: {'; '.join(problems)}")
    return family


def config_to_hf(config: TransformerConfig, family: str, special: dict[str, int | list[int] | None]) -> dict:
    """config.json for `config` in `family` (from `family_of`); `special` holds bos/eos/pad token ids."""
    c = config
    common = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "torch_dtype": "float32",
        **{f"{k}_token_id": v for k, v in special.items()},
    }
    return {**common, **(_gpt2_to_hf(c) if family == "gpt2" else _llama_to_hf(c, family))}


def _gpt2_to_hf(c: TransformerConfig) -> dict:
    return {
        "n_embd": c.d_model,
        "n_head": c.num_heads,
        "n_layer": c.num_layers,
        "n_positions": c.max_seq_len,
        "n_inner": c.ffn_width,
        "activation_function": {"gelu_tanh": "gelu_new"}.get(c.activation, c.activation),
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
    }


def _llama_to_hf(c: TransformerConfig, family: str) -> dict:
    rope = _rope_parameters(c)
    out = {
        "hidden_size": c.d_model,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size,
        "num_hidden_layers": c.num_layers,
        "intermediate_size": c.ffn_width,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        # both spellings: transformers 5 reads rope_parameters, earlier versions rope_theta/rope_scaling
        "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope if c.rope_scaling != "none" else None,
        "attention_dropout": c.dropout,
    }
    if family == "llama":
        out.update(attention_bias=c.bias, mlp_bias=c.bias)
    if family == "qwen3":
        out.update(attention_bias=c.bias)
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def _rope_parameters(c: TransformerConfig) -> dict:
    """config.json's rope_parameters: the base, and llama3 scaling's factors (the inverse of `_rope_settings`)."""
    if c.rope_scaling != "llama3":
        return {"rope_type": "default", "rope_theta": c.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": c.rope_theta,
        "factor": c.rope_scaling_factor,
        "low_freq_factor": c.rope_low_freq_factor,
        "high_freq_factor": c.rope_high_freq_factor,
        "original_max_position_embeddings": c.rope_original_max_seq_len,
    }


def split_sizes(config: TransformerConfig) -> list[int]:
    """Rows of the fused qkv matrix that belong to q, k and v."""
    return [config.num_heads * config.head_size, config.kv_heads * config.head_size, config.kv_heads * config.head_size]
