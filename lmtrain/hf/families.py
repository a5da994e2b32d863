"""The Hugging Face model families lmtrain reads and writes, in one table, and the functions that look a
family up in it. Each family (its config.json keys, weight names and state-dict layout) lives in its own
module: gpt2.py, and llama.py for Llama, Mistral, Qwen2 and Qwen3; layout.py says what a `Family` holds.
Adding a family is one module and one entry here.
"""

from __future__ import annotations

from lmtrain.core.errors import UserError
from lmtrain.hf.gpt2 import GPT2
from lmtrain.hf.layout import Family
from lmtrain.hf.llama import LLAMA, MISTRAL, QWEN2, QWEN3
from lmtrain.model.transformer import TransformerConfig

# config.json's model_type -> family; for export, the first family that takes a config wins.
FAMILIES: dict[str, Family] = {family.name: family for family in (GPT2, LLAMA, MISTRAL, QWEN2, QWEN3)}


def config_from_hf(hf: dict) -> TransformerConfig:
    """lmtrain's config for a Hugging Face config.json. Raises UserError for a family or an option lmtrain
    does not implement, naming the key."""
    name = hf.get("model_type")
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise UserError(f"config.json: model_type '{name}' is not supported (supported: {', '.join(FAMILIES)})")
    try:
        config = family.read(hf)
    except KeyError as err:
        raise UserError(f"config.json: missing key {err} for model_type '{name}'") from None
    except (TypeError, ValueError) as err:  # a value of the wrong type: untrusted input, one line
        raise UserError(f"config.json: a value has the wrong type ({err})") from None
    if config.num_heads % config.kv_heads or (config.head_dim is None and config.d_model % config.num_heads):
        raise UserError(
            f"config.json: {config.num_heads} attention heads do not split into {config.kv_heads} key/value heads "
            f"of a {config.d_model}-wide model"
        )
    return config


def weight_layout(config: TransformerConfig) -> Family:
    """A family whose weight names hold `config`'s parameters (families with one position encoding share a
    layout), to read a folder's weights into a model built from its config.json."""
    return next(family for family in FAMILIES.values() if family.position == config.position)


def family_of(config: TransformerConfig) -> Family:
    """The Hugging Face family that expresses `config` exactly; UserError naming what none can express."""
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
    candidates = [family for family in FAMILIES.values() if family.position == c.position]
    problems += candidates[0].problems(c)  # the families of one position share a layout
    if problems:
        raise UserError(f"ckpt: no Hugging Face family can express this model: {'; '.join(problems)}")
    return next(family for family in candidates if family.takes(c))


def config_to_hf(config: TransformerConfig, family: Family, special: dict[str, int | list[int] | None]) -> dict:
    """config.json for `config` in `family` (from `family_of`); `special` holds bos/eos/pad token ids."""
    c = config
    common = {
        "architectures": [family.architecture],
        "model_type": family.name,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": c.init_std,
        "torch_dtype": "float32",
        **{f"{k}_token_id": v for k, v in special.items()},
    }
    return {**common, **family.write(c)}


def split_sizes(config: TransformerConfig) -> list[int]:
    """Rows of the fused qkv matrix that belong to q, k and v."""
    return [config.num_heads * config.head_size, config.kv_heads * config.head_size, config.kv_heads * config.head_size]
