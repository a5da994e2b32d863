"""The Llama layout (`transformers`' LlamaForCausalLM): RoPE, RMSNorm, a SwiGLU FFN and separate q/k/v
projections. Mistral, Qwen2 and Qwen3 share it: Mistral adds a sliding window, Qwen2 biases on q/k/v only,
Qwen3 q_norm/k_norm."""

from __future__ import annotations

import logging
from functools import partial

from lmtrain.config.choices import Activation, Norm, Position, RopeScaling
from lmtrain.core.errors import UserError
from lmtrain.hf.config_values import need, positive, size
from lmtrain.hf.layout import Family, Rule
from lmtrain.model.transformer import TransformerConfig

log = logging.getLogger("lmtrain")
_RULES: tuple[Rule, ...] = (
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
)


def _rope_settings(hf: dict) -> dict:
    """RoPE base and scaling from config.json: `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (earlier versions)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = positive({"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}, "rope_theta")
    settings: dict = {"rope_theta": theta}
    if kind == "llama3":
        settings.update(
            rope_scaling=RopeScaling.llama3,
            rope_scaling_factor=positive(params, "factor"),
            rope_low_freq_factor=positive(params, "low_freq_factor"),
            rope_high_freq_factor=positive(params, "high_freq_factor"),
            rope_original_max_seq_len=size(params, "original_max_position_embeddings"),
        )
    elif kind != "default":
        raise UserError(f"config.json: rope scaling '{kind}' is not supported (supported: default, llama3)")
    return settings


def _context_length(hf: dict, always_sliding: bool) -> int:
    """max_position_embeddings, capped at the sliding window where one applies: lmtrain attends to the whole
    context, which equals sliding-window attention exactly as long as the context fits in the window."""
    length = size(hf, "max_position_embeddings")
    window = size(hf, "sliding_window") if hf.get("sliding_window") is not None else None
    layer_types = hf.get("layer_types") or []
    sliding = (
        always_sliding or bool(hf.get("use_sliding_window")) or any(kind == "sliding_attention" for kind in layer_types)
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


def _read(hf: dict, *, always_sliding: bool, qkv_bias: bool, qk_norm: bool) -> TransformerConfig:
    need(hf, "hidden_act", "silu", "the FFN is SwiGLU")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise UserError(
            f"config.json: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
            "(lmtrain puts biases on every linear layer or on none)"
        )
    if hf.get("pretraining_tp", 1) != 1:
        log.info("config.json: pretraining_tp=%s only changes how the reference splits matmuls", hf["pretraining_tp"])
    heads = size(hf, "num_attention_heads")
    d_model = size(hf, "hidden_size")
    if hf.get("head_dim") is None and d_model % heads:
        raise UserError(f"config.json: num_attention_heads={heads} does not divide hidden_size={d_model}")
    return TransformerConfig(
        vocab_size=size(hf, "vocab_size"),
        d_model=d_model,
        num_heads=heads,
        num_layers=size(hf, "num_hidden_layers"),
        max_seq_len=_context_length(hf, always_sliding),
        num_kv_heads=size(hf, "num_key_value_heads") if hf.get("num_key_value_heads") else heads,
        head_dim=size(hf, "head_dim") if hf.get("head_dim") is not None else d_model // heads,
        d_ff=size(hf, "intermediate_size"),
        activation=Activation.swiglu,
        norm=Norm.rmsnorm,
        norm_eps=positive(hf, "rms_norm_eps", 1e-6),
        position=Position.rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=attention_bias,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        init_std=positive(hf, "initializer_range", 0.02),
        **_rope_settings(hf),
    )


def _write(c: TransformerConfig, *, bias_keys: tuple[str, ...], window_keys: bool) -> dict:
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
    out.update(dict.fromkeys(bias_keys, c.bias))
    if window_keys:
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


def _problems(c: TransformerConfig) -> list[str]:
    """What of a config with RoPE the Llama layout cannot express."""
    problems = []
    if c.norm != "rmsnorm":
        problems.append(f"norm={c.norm} with RoPE (Llama-style families use rmsnorm)")
    if c.activation not in ("swiglu", "relu2"):  # relu2 is named by families.family_of
        problems.append(f"activation={c.activation} with RoPE (Llama-style families use swiglu)")
    if c.qkv_bias and c.qk_norm:
        problems.append("qkv_bias together with qk_norm")
    return problems


def _takes(c: TransformerConfig, *, qkv_bias: bool, qk_norm: bool) -> bool:
    """Whether the family's own parts are the config's: q/k/v biases without other biases, and q/k norms."""
    return c.qk_norm == qk_norm and bool(c.qkv_bias and not c.bias) == qkv_bias


def _family(
    name: str,
    architecture: str,
    *,
    sliding: bool = False,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    bias_keys: tuple[str, ...] = (),
    window_keys: bool = False,
) -> Family:
    """A family of the Llama layout: `sliding` caps the context at any sliding window config.json gives,
    `qkv_bias`/`qk_norm` are its own parts, `bias_keys` and `window_keys` the config.json keys it writes for
    biases and (a disabled) sliding window."""
    return Family(
        name=name,
        architecture=architecture,
        position=Position.rope,
        read=partial(_read, always_sliding=sliding, qkv_bias=qkv_bias, qk_norm=qk_norm),
        write=partial(_write, bias_keys=bias_keys, window_keys=window_keys),
        problems=_problems,
        takes=partial(_takes, qkv_bias=qkv_bias, qk_norm=qk_norm),
        rules=_RULES,
    )


LLAMA = _family("llama", "LlamaForCausalLM", bias_keys=("attention_bias", "mlp_bias"))
# Mistral expresses nothing Llama does not: export writes such a model as Llama (first in the table).
MISTRAL = _family("mistral", "MistralForCausalLM", sliding=True)
QWEN2 = _family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, window_keys=True)
QWEN3 = _family("qwen3", "Qwen3ForCausalLM", qk_norm=True, bias_keys=("attention_bias",), window_keys=True)
