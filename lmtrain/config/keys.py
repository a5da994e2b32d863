"""The keys of the schemas: every dotted path, the text-typed ones, the fixed value sets of the Choice-typed
ones (CHOICES), and the nearest valid name for a misspelling."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf, StringNode

from lmtrain.config.choices import Choice
from lmtrain.config.store import SCHEMAS


def _choices(schema: type, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Dotted key -> allowed values, for every key typed with a Choice enum (lmtrain.config.choices)."""
    found = {}
    for name, hint in typing.get_type_hints(schema).items():
        options = [t for t in typing.get_args(hint) or (hint,) if isinstance(t, type)]
        for kind in options:
            if issubclass(kind, Choice):
                found[prefix + name] = tuple(member.value for member in kind)
            elif dataclasses.is_dataclass(kind):
                found.update(_choices(kind, f"{prefix}{name}."))
    return found


def nearest(name: str, candidates: list[str]) -> str | None:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf and node in a config or dataclass schema."""
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    keys = []
    for key in map(str, node.keys()):
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(all_keys(child, path + "."))
    return keys


def string_keys(schema: type) -> set[str]:
    """Dotted paths of the schema's string-typed leaves (prompt, text, paths, names)."""
    node = OmegaConf.structured(schema)
    keys = set()
    for key in all_keys(schema):
        parent, _, leaf = key.rpartition(".")
        owner = OmegaConf.select(node, parent) if parent else node
        if isinstance(owner._get_node(leaf), StringNode):
            keys.add(key)
    return keys


# every command's keys with a fixed set of values: key -> the values, in declaration order
CHOICES = {key: values for schema in SCHEMAS.values() for key, values in _choices(schema).items()}
