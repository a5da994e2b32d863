"""What a Hugging Face model family is to lmtrain: a `Family` holds its config.json mapping in both directions,
its weight-name rules and how its state dict stores them. Each family's module (gpt2.py, llama.py) builds its
`Family` objects; families.py puts them in one table."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lmtrain.model.transformer import TransformerConfig

# (lmtrain parameter pattern, Hugging Face name templates filled with the pattern's groups, stored transposed)
Rule = tuple[str, tuple[str, ...], bool]
HEAD_RULE: Rule = (r"lm_head\.weight", ("lm_head.weight",), False)
# Buffers some checkpoints carry that are derived from the config, not weights.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class Source:
    """Where one lmtrain parameter lives in a Hugging Face state dict: one tensor, or several concatenated
    along dim 0 (q, k, v), optionally stored transposed (GPT-2's Conv1D)."""

    names: tuple[str, ...]
    transposed: bool = False


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family (config.json's `model_type`).

    `read` maps config.json to lmtrain's config (raising UserError, or KeyError for a missing key); `write` gives
    the family's own config.json keys for a config it expresses. A lmtrain config goes to the families whose
    `position` it has; `problems` names what of it their shared layout cannot express, and the first of them in
    the table whose `takes` accepts it writes it. `prefix` starts the names of every tensor but the head in the
    state dict (`from_pretrained` also reads folders without it); `transposed` says its linear weights are stored
    [in, out] (GPT-2's Conv1D); `zero_biases` says every layer has biases, written as zeros for a model without."""

    name: str
    architecture: str
    position: str
    read: Callable[[dict], TransformerConfig]
    write: Callable[[TransformerConfig], dict]
    problems: Callable[[TransformerConfig], list[str]]
    takes: Callable[[TransformerConfig], bool]
    rules: tuple[Rule, ...]
    prefix: str = ""
    transposed: bool = False
    zero_biases: bool = False

    def source(self, name: str) -> Source:
        """The Hugging Face tensor(s) holding lmtrain parameter `name` (without `prefix`)."""
        for pattern, names, transposed in (*self.rules, HEAD_RULE):
            match = re.fullmatch(pattern, name)
            if match:
                return Source(tuple(n.format(*match.groups()) for n in names), transposed)
        raise KeyError(f"no Hugging Face name for parameter {name!r} in family {self.name!r}")
