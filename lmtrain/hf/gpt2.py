"""GPT-2 (`transformers`' GPT2LMHeadModel): learned positions, LayerNorm, biases everywhere, and Conv1D linear
layers that store their weights [in, out] under `transformer.`."""

from __future__ import annotations

from lmtrain.config.choices import Activation, Norm, Position
from lmtrain.core.errors import UserError
from lmtrain.hf.config_values import need, positive, size
from lmtrain.hf.layout import Family, Rule
from lmtrain.model.transformer import TransformerConfig

_RULES: tuple[Rule, ...] = (
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
)
_ACTIVATIONS = {
    "gelu_new": Activation.gelu_tanh,
    "gelu_pytorch_tanh": Activation.gelu_tanh,
    "gelu": Activation.gelu,
    "relu": Activation.relu,
}


def _read(hf: dict) -> TransformerConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UserError(f"config.json: activation_function '{act}' is not supported ({', '.join(_ACTIVATIONS)})")
    need(hf, "scale_attn_weights", True, "attention is scaled by 1/sqrt(head size)")
    need(hf, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling")
    need(hf, "add_cross_attention", False, "decoder-only")
    return TransformerConfig(
        vocab_size=size(hf, "vocab_size"),
        d_model=size(hf, "n_embd"),
        num_heads=size(hf, "n_head"),
        num_layers=size(hf, "n_layer"),
        max_seq_len=size(hf, "n_positions"),
        d_ff=size(hf, "n_inner") if hf.get("n_inner") is not None else None,
        activation=_ACTIVATIONS[act],
        norm=Norm.layernorm,
        norm_eps=positive(hf, "layer_norm_epsilon", 1e-5),
        position=Position.learned,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bias=True,
        init_std=positive(hf, "initializer_range", 0.02),
    )


def _write(c: TransformerConfig) -> dict:
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


def _problems(c: TransformerConfig) -> list[str]:
    """What of a config with learned positions GPT-2 cannot express (a model without biases it can: they are
    written as zeros)."""
    wanted = {"norm": "layernorm", "rope_scaling": "none", "qkv_bias": False, "qk_norm": False}
    problems = [f"{k}={getattr(c, k)} with learned positions" for k, v in wanted.items() if getattr(c, k) != v]
    if c.activation == "swiglu":
        problems.append("a SwiGLU FFN with learned positions")
    if c.kv_heads != c.num_heads or c.head_size * c.num_heads != c.d_model:
        problems.append("grouped-query attention or a separate head_dim with learned positions")
    return problems


GPT2 = Family(
    name="gpt2",
    architecture="GPT2LMHeadModel",
    position=Position.learned,
    read=_read,
    write=_write,
    problems=_problems,
    takes=lambda c: True,
    rules=_RULES,
    prefix="transformer.",
    transposed=True,
    zero_biases=True,
)
