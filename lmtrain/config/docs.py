"""The one-line doc of every schema field, read from the comment beside it in `lmtrain/config/schema.py`,
and the `lmtrain <command> --help` listing built from them: key, type, value, doc."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import tokenize
from typing import Any

from omegaconf import OmegaConf

from lmtrain.config import schema as schema_module
from lmtrain.config.keys import CHOICES


@functools.cache
def field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's line in schema.py, or on the line above when
    the field is too long to carry one ('' when it has neither)."""
    source = inspect.getsource(schema_module)
    lines = source.splitlines()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    for line in list(comments):
        if lines[line - 1].lstrip().startswith("#") and line + 1 not in comments:
            comments[line + 1] = comments[line]
    docs = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    docs[(node.name, item.target.id)] = comments.get(item.end_lineno or item.lineno, "")
    return docs


def fields(schema: type, values: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, value, doc) of every leaf of `schema` in declaration order; `values` is the composed config
    (or the dataclass object) whose values are shown."""
    rows = []
    for f in dataclasses.fields(schema):
        value = getattr(values, f.name, None) if not isinstance(values, dict) else values.get(f.name)
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            rows += fields(nested, value, f"{prefix}{f.name}.")
            continue
        doc = field_docs().get((schema.__name__, f.name), "")
        key = f"{prefix}{f.name}"
        kind = "|".join(CHOICES[key]) + (" | None" if "None" in str(f.type) else "") if key in CHOICES else str(f.type)
        rows.append((key, kind, _shown(value), doc))
    return rows


def _shown(value: Any) -> str:
    """A value as it is typed on the command line: null, true, 1e-3, [a, b]."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value).replace('"', "")


def help_text(
    command: str, schema: type, values: Any, choices: dict[str, list[str]], chosen: dict[str, str], only: list[str]
) -> str:
    """The listing `lmtrain <command> --help [group ...]` prints: each group's options (the chosen one
    starred), then every key (or only those under the groups named) with its type, value and doc."""
    lines = [f"usage: lmtrain {command} [group=option ...] [key=value ...]   (--help [group ...]: only those keys)", ""]
    if choices:
        lines.append("groups (* the option in use):")
        for group, options in sorted(choices.items()):
            if not only or group in only:
                marked = [f"*{o}" if o == chosen.get(group) else o for o in options]
                lines.append(f"  {group}: {' '.join(marked)}")
        lines.append("")
    rows = [row for row in fields(schema, values) if not only or row[0].split(".")[0] in only]
    width = max((len(r[0]) for r in rows), default=0)
    type_width = max((len(r[1]) for r in rows), default=0)
    value_width = min(max((len(r[2]) for r in rows), default=0), 24)
    lines.append("keys (type, value, doc):")
    for key, kind, value, doc in rows:
        lines.append(f"  {key:<{width}}  {kind:<{type_width}}  {value:<{value_width}}  {doc}".rstrip())
    return "\n".join(lines)
