"""Finetuning data: records read with `datasets`, encoded examples, and length-bucketed padded batches."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtrain.core.errors import UserError
from lmtrain.data import corpus

log = logging.getLogger("lmtrain")


@dataclass
class Example:
    ids: list[int]  # the whole sequence: prompt then target (lm/seq2seq/qa), or the text (classification)
    loss_start: int = 0  # ids[loss_start:] are predicted with loss; the prompt before it carries none
    label: int | None = None  # classification
    reference: str | None = None  # the target text, for generation metrics
    loss_mask: list[bool] | None = None  # chat: ids[i] is predicted with loss where True (overrides loss_start)

    def targets(self, ignore_index: int) -> torch.Tensor:
        """Next-token targets [len(ids) - 1]: ids[j + 1], or ignore_index where it carries no loss."""
        ids = torch.tensor(self.ids)
        if self.loss_mask is not None:
            keep = torch.tensor(self.loss_mask[1:], dtype=torch.bool)
        else:
            keep = torch.arange(1, len(self.ids)) >= max(self.loss_start, 1)
        return torch.where(keep, ids[1:], torch.full_like(ids[1:], ignore_index))


def read_records(source: str, key: str, fields: list[str] | None = None, txt_by: str = "line") -> list[dict]:
    """Records of a jsonl/csv/parquet/txt file (or a `datasets` name), checked to hold `fields` (and cut
    down to them). A .txt file gives one record {"text": ...} per line, or per file with txt_by="document"."""
    files = corpus.resolve_files(source, key)
    if files is not None and all(p.stat().st_size == 0 for p in files):
        raise UserError(f"{key}: '{source}' holds no records")
    import datasets

    datasets.disable_progress_bars()
    try:
        if files is None:  # a `datasets` name: data.validation / data.test read that split
            split = {"data.validation": "validation", "data.test": "test"}.get(key, "train")
            dataset = datasets.load_dataset(source, split=split)
        else:
            builder = corpus.BUILDERS[files[0].suffix]
            options = {"sample_by": txt_by} if builder == "text" else {}
            with corpus.quiet_datasets():
                dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except Exception as err:  # datasets raises many types for unreadable input
        raise corpus.unreadable(err, key, source, files) from err
    missing = [f for f in fields or [] if f not in dataset.column_names]
    if missing:
        raise UserError(
            f"{key}: '{source}' has no field '{missing[0]}'; its fields are {', '.join(dataset.column_names)} "
            f"(set data.<role>_field to the right name)"
        )
    if len(dataset) == 0:
        raise UserError(f"{key}: '{source}' holds no records")
    return (dataset.select_columns(fields) if fields else dataset).to_list()


def usable_records(
    records: list[dict], types: dict[str, tuple[type, ...]], key: str, source: str, on_bad: str
) -> tuple[list[dict], int]:
    """The records whose every field in `types` holds a value of those types, and how many were not.

    A missing, null or mistyped field skips the record with a warning (on_bad="skip"), or is a UserError
    naming the file, line and field (on_bad="error"). Raises UserError when no record is usable.
    """
    kept, skipped, first = [], 0, ""
    for number, record in enumerate(records, 1):
        bad = next((f for f, allowed in types.items() if not isinstance(record.get(f), allowed)), None)
        if bad is None:
            kept.append(record)
            continue
        value = record.get(bad)
        what = "null or missing" if value is None else f"{type(value).__name__} {value!r}"[:60]
        unit = "line" if Path(source).suffix in (".jsonl", ".txt", ".md") else "record"
        problem = f"{key}: '{source}' {unit} {number}: field '{bad}' is {what}"
        if on_bad == "error":
            raise UserError(problem)
        skipped, first = skipped + 1, first or problem
    if skipped:
        log.warning("%s: skipped %d of %d records (first: %s)", key, skipped, len(records), first.split(": ", 1)[1])
    if not kept:
        raise UserError(f"{first}; no usable record is left (all {len(records)} skipped)")
    return kept, skipped


def split_off(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of the training examples held out for validation."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, int(len(items) * fraction))
    if held >= len(items):
        raise UserError(f"data.train: {len(items)} examples are too few to hold out data.val_fraction={fraction}")
    return [items[i] for i in order[held:]], [items[i] for i in order[:held]]


def collate(examples: list[Example], pad_id: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, next-token targets), each [batch, longest - 1], with ignore_index on prompt and
    padding."""
    width = max(len(e.ids) for e in examples) - 1
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), ignore_index, dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        tokens[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = e.targets(ignore_index)
    return tokens, targets


def pack(lengths: list[int], order: list[int], width: int) -> list[list[int]]:
    """Example indices (taken in `order`) packed into rows of at most `width` tokens by first fit over the
    last 32 open rows; an example never splits across rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        need = lengths[index]
        first = len(rows) - len(room[-32:])
        slot = next((r for r in range(first, len(rows)) if room[r] >= need), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= need
    return rows


def collate_packed(rows: list[list[Example]], pad_id: int, ignore_index: int):
    """Packed sequences: ({tokens, document_ids}, targets), each [rows, width]. Each example keeps its own
    inputs and targets (prompt and padding targets are ignore_index); document_ids number the examples of a
    row (padding is -1), so the model attends within an example only and restarts its positions."""
    width = max(sum(len(e.ids) - 1 for e in row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for k, e in enumerate(row):
            ids, n = torch.tensor(e.ids), len(e.ids) - 1
            tokens[r, offset : offset + n] = ids[:-1]
            targets[r, offset : offset + n] = e.targets(ignore_index)
            documents[r, offset : offset + n] = k
            offset += n
    return {"tokens": tokens, "document_ids": documents}, targets


class ExampleBatches:
    """Shuffled, length-bucketed batches of examples, epoch after epoch; resumable exactly.

    Each epoch shuffles by a generator seeded with (seed, epoch); examples are sorted by length within
    windows of 32 batches so a batch pads little, and the batch order is shuffled again. With `pack_width`
    the shuffled examples are packed into rows of that many tokens instead, and a batch is `batch_size` rows.
    `collate` makes a batch the model's (inputs, targets): from a list of examples, or with `pack_width` from
    a list of rows (lists) of examples.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seed: int,
        collate: Callable[[list], tuple],
        pack_width: int | None = None,
    ):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.collate, self.pack_width = collate, pack_width
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        if self.pack_width is not None:
            rows = pack([len(e.ids) - 1 for e in self.examples], order, self.pack_width)
            return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        window = self.batch_size * 32
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(self.examples[i].ids))
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order)

    def _next_indices(self) -> list:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        self.position += 1
        return self._order[self.position - 1]

    def next_step(self, num_micro_batches: int, rank: int = 0, world_size: int = 1) -> list:
        """This process's micro-batches of one step: every process walks the same batch order and keeps
        (and pads) only its own consecutive share, as one process accumulating them all would see them."""
        step = [self._next_indices() for _ in range(num_micro_batches * world_size)]
        mine = step[rank * num_micro_batches : (rank + 1) * num_micro_batches]
        if self.pack_width is not None:
            return [self.collate([[self.examples[i] for i in row] for row in rows]) for rows in mine]
        return [self.collate([self.examples[i] for i in indices]) for indices in mine]

    def steps_per_epoch(self, num_micro_batches: int, world_size: int = 1) -> int:
        return max(1, math.ceil(self.batches_per_epoch / (num_micro_batches * world_size)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"epoch": torch.tensor([self.epoch]), "position": torch.tensor([self.position])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.epoch, self.position = int(state["epoch"][0]), int(state["position"][0])
        self._order = self._epoch_order(self.epoch)


def fixed_batches(examples: list[Example], batch_size: int, collate: Callable[[list[Example]], tuple]) -> list:
    """Evaluation batches (`collate` of each): every example once, sorted by length to pad little."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    return [collate(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
