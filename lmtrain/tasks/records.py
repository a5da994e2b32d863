"""A task's records on disk: the field each role reads (data.<role>_field) and the examples of a split,
held out again exactly as finetune held them out when the split is part of train."""

from __future__ import annotations

import dataclasses

from lmtrain.config import ExampleDataConfig
from lmtrain.core.errors import UserError
from lmtrain.data.examples import read_records, split_off, usable_records
from lmtrain.tasks.base import Task


def data_fields(d: ExampleDataConfig) -> dict[str, str]:
    """Role (text, label, source, ...) -> the record field data.<role>_field names."""
    keys = [f.name for f in dataclasses.fields(d) if f.name.endswith("_field")]
    return {key[: -len("_field")]: getattr(d, key) for key in keys}


def split_examples(
    trained: dict, task: Task, split: str, path: str | None = None, on_bad_record: str = "skip"
) -> tuple[list, str, int]:
    """A split's examples, the file they came from and how many of its records were skipped (a missing,
    null or mistyped field): `path`, else the file the checkpoint was trained with; a validation split held
    out of train is held out again the same way finetune did (`trained`: the checkpoint's config)."""
    types = task.record_types(task.info)
    data = trained.get("data", {})
    path = path or data.get(split)
    if path:
        key, source = f"data.{split}", path
    elif split == "validation" and data.get("train") and "val_fraction" in data:
        key, source = "data.train", data["train"]
    else:
        raise UserError(f"data.{split}: missing; pass data.{split}=path/to/{split}.jsonl")
    records = read_records(source, key, None if task.whole_records else list(types), task.text_unit)
    records, skipped = usable_records(records, types, key, source, on_bad_record)
    examples = task.encode(records, key, source)
    if not path:
        examples = split_off(examples, data["val_fraction"], trained["trainer"]["seed"])[1]
    return examples, source, skipped
