"""data.streaming=true: train on a `datasets` dataset read as a stream, tokenized on the fly on a background
thread (the trainer takes tokens that are already encoded), never prepared into token files.

The source is a folder written by `Dataset.save_to_disk` or a `datasets` name. Its documents form one token
stream (end-of-text between documents); each step takes the next consecutive windows, each sharing its first
token with the previous window's last target. The first windows are held out for validation. The sampler's
state is the stream position (document number, token within it), so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import write_text_atomic
from lmtrain.data.encoder import Encoder
from lmtrain.data.prepare import locked
from lmtrain.data.tokenizer import build_tokenizer, document_framing, load_tokenizer

if TYPE_CHECKING:  # torch is imported where it is used: `lmtrain prepare` never loads it
    import torch

BATCH_RECORDS = 256  # documents per encode call
AHEAD = 16  # encoded batches waiting for the trainer


def _dataset(source: str):
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(source, split="train")  # the local cache's copy, memory-mapped
    except Exception as err:  # datasets raises many types for unreadable input
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"data.train: cannot stream '{source}': {first}") from None


def documents(source: str, text_field: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(document number, text) from document `start` on; records whose text is missing or empty are numbered
    but yield nothing."""
    dataset = _dataset(source)
    if text_field not in dataset.column_names:
        fields = ", ".join(dataset.column_names)
        raise UserError(f"data.text_field: '{source}' has no field '{text_field}'; its fields are {fields}")
    stream = dataset.select_columns([text_field]).to_iterable_dataset().skip(start)
    for number, record in enumerate(stream, start):
        text = record[text_field]
        if isinstance(text, str) and text:
            yield number, text


def tokenizer(settings: dict, existing: Tokenizer | None) -> Tokenizer:
    """`existing`, else data.tokenizer trained on the stream's first tokenizer_sample_chars characters (BPE) or on
    all of it (char), cached under cache_dir/stream-tokenizers/ by the dataset's fingerprint and the settings."""
    if existing is not None:
        return existing
    kind, source = settings["tokenizer"], settings["train"]
    if kind == "byte":
        return build_tokenizer("byte", [], 0)
    dataset = _dataset(source)
    parts = {
        "dataset": dataset._fingerprint,
        "rows": dataset.num_rows,
        **{k: settings[k] for k in ("tokenizer", "text_field", "vocab_size", "tokenizer_sample_chars")},
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(settings["cache_dir"]).expanduser() / "stream-tokenizers" / key / "tokenizer.json"
    with locked(path.parent):
        if not path.exists():
            limit = settings["tokenizer_sample_chars"] if kind == "bpe" else None

            def sample() -> Iterator[str]:
                taken = 0
                for _, text in documents(source, settings["text_field"]):
                    if limit is not None and taken >= limit:
                        return
                    taken += len(text)
                    yield text

            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, build_tokenizer(kind, sample(), settings["vocab_size"]).to_str())
    return load_tokenizer(str(path))


class TokenStream:
    """The stream's token ids from a position (document number, token within that document's ids, whose first
    is the end-of-text separator for every document but the first, then the tokenizer's own leading tokens:
    `document_framing`), encoded ahead on a background thread."""

    def __init__(self, source: str, text_field: str, encoder: Encoder, separator: int, position=(0, 0)):
        self.source, self.text_field, self.encoder = source, text_field, encoder
        self.separator = separator
        self.starts = [np.array(ids, dtype=encoder.dtype) for ids in document_framing(encoder.tokenizer, separator)]
        self.position = position
        self._queue: queue.Queue | None = None
        self._pending: list[tuple[int, np.ndarray]] = []
        self._stop = threading.Event()

    def _produce(self, start: int, out: queue.Queue) -> None:
        try:
            batch: list[tuple[int, str]] = []
            for item in documents(self.source, self.text_field, start):
                batch.append(item)
                if len(batch) == BATCH_RECORDS:
                    self._put(out, self._encode(batch))
                    batch = []
            if batch:
                self._put(out, self._encode(batch))
            self._put(out, None)
        except BaseException as err:  # handed to the trainer's thread, raised there
            self._put(out, err)

    def _encode(self, batch: list[tuple[int, str]]) -> list[tuple[int, np.ndarray]]:
        encoded = self.encoder.encode([text for _, text in batch])
        return [
            (number, np.concatenate([self.starts[number > 0], ids]))
            for (number, _), ids in zip(batch, encoded, strict=True)
        ]

    def _put(self, out: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def take(self, count: int) -> np.ndarray:
        """The next `count` token ids; UserError when the stream ends first."""
        if self._queue is None:
            self._queue = queue.Queue(AHEAD)
            threading.Thread(target=self._produce, args=(self.position[0], self._queue), daemon=True).start()
        parts, need = [], count
        while need:
            if not self._pending:
                item = self._queue.get()
                if item is None:
                    raise UserError(f"data.train: the stream '{self.source}' ended; lower trainer.max_steps")
                if isinstance(item, BaseException):
                    raise item
                self._pending = [(n, ids) for n, ids in item if n >= self.position[0]]
                continue
            number, ids = self._pending[0]
            if number > self.position[0]:  # the documents between held no text
                self.position = (number, 0)
            part = ids[self.position[1] : self.position[1] + need]
            parts.append(part)
            need -= len(part)
            offset = self.position[1] + len(part)
            if offset == len(ids):
                self._pending.pop(0)
                self.position = (number + 1, 0)
            else:
                self.position = (number, offset)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.encoder.dtype)

    def close(self) -> None:
        self._stop.set()


class StreamSampler:
    """Consecutive windows of a TokenStream: each step takes the next windows of all processes (every process
    reads the whole stream and keeps its own slice, as WindowSampler does)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        import torch

        self.stream, self.seq_len = stream, seq_len
        self.carry = stream.take(1)  # the first token of the next window (the last target of the previous)
        self.taken = torch.zeros((), dtype=torch.int64)  # training tokens drawn (inputs), all processes

    def next_step(
        self, num_micro_batches: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        count = num_micro_batches * micro_batch_size
        flat = np.concatenate([self.carry, self.stream.take(count * world_size * self.seq_len)])
        self.carry = flat[-1:]
        self.taken += count * world_size * self.seq_len
        starts = np.arange(rank * count, (rank + 1) * count) * self.seq_len
        windows = torch.from_numpy(flat[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(micro_batch_size)]

    def accounting(self) -> dict[str, float]:
        return {"stream_documents": self.stream.position[0]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        import torch

        document, offset = self.stream.position
        return {"position": torch.tensor([document, offset]), "carry": torch.from_numpy(self.carry.astype(np.int64))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.stream.close()
        document, offset = (int(v) for v in state["position"])
        old = self.stream
        self.stream = TokenStream(old.source, old.text_field, old.encoder, old.separator, (document, offset))
        self.carry = state["carry"].numpy().astype(old.encoder.dtype)


def open_stream(
    settings: dict, tokenizer_: Tokenizer, separator: int, seq_len: int, validation_windows: int
) -> tuple[StreamSampler, np.ndarray]:
    """The training sampler, and the held-out validation tokens: the stream's first `validation_windows`
    windows, which training never sees."""
    encoder = Encoder(tokenizer_, "data.train")
    head = TokenStream(settings["train"], settings["text_field"], encoder, separator)
    validation = head.take(validation_windows * seq_len + 1)
    head.close()
    rest = TokenStream(settings["train"], settings["text_field"], encoder, separator, head.position)
    return StreamSampler(rest, seq_len), validation
