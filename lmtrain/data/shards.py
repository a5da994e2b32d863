"""Token shards: a split's token stream stored as fixed-size files, written resumably and read back as one array.

On disk, for a split `name` in a folder:
  name_00000.bin ...   token ids (the manifest's dtype), `shard_tokens` each; the last one may be shorter
  name_00000.idx ...   int64 stream positions of the documents that start in that shard (each at its
                       end-of-text separator, or at 0 for the first document)
  name.progress.json   while writing: shards finished and where in the input the next one starts
A shard is written under a temporary name and renamed when full, so a killed preparation keeps every finished
shard and restarts at the first unfinished one.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import write_text_atomic, writing


def shard_name(name: str, index: int) -> str:
    return f"{name}_{index:05d}"


class ShardWriter:
    """Appends token ids to a split's shards. `resume_at` says which input item (and token within it) the
    first unfinished shard starts at; the caller skips the input before it."""

    def __init__(self, folder: Path, name: str, shard_tokens: int, dtype: np.dtype):
        self.folder, self.name, self.shard_tokens, self.dtype = folder, name, shard_tokens, np.dtype(dtype)
        self.progress_path = folder / f"{name}.progress.json"
        state = json.loads(self.progress_path.read_text()) if self.progress_path.exists() else {}
        self.record: dict | None = state.get("record")  # set once the split is finished
        self.shards = state.get("shards", 0)  # finished shards
        self.resume_at = (state.get("item", 0), state.get("offset", 0))
        self.position = self.shards * shard_tokens  # stream position of the next token
        self._file: BinaryIO | None = None
        self._starts = array("q")

    def _open(self) -> BinaryIO:
        path = self.folder / f"{shard_name(self.name, self.shards)}.bin.partial"
        with writing(path):
            self._file = open(path, "wb")
        return self._file

    def add(self, ids: np.ndarray, item: int, offset: int, starts_document: bool) -> None:
        """Append `ids`, tokens `offset`.. of input item `item`; `starts_document`: they open a document."""
        if starts_document:
            self._starts.append(self.position)
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            file = self._file if self._file is not None else self._open()
            room = (self.shards + 1) * self.shard_tokens - self.position
            part, ids = ids[:room], ids[room:]
            with writing(file.name):
                file.write(part.tobytes())
            self.position += len(part)
            offset += len(part)
            if self.position == (self.shards + 1) * self.shard_tokens:
                self._close_shard(item, offset)

    def _close_shard(self, item: int, offset: int) -> None:
        """Finish the open shard; the next one starts at token `offset` of input item `item`."""
        base = self.folder / shard_name(self.name, self.shards)
        file = self._file
        assert file is not None, "a shard is open whenever tokens were added"
        with writing(base.with_suffix(".bin")):
            file.flush()
            os.fsync(file.fileno())
            file.close()
            self._file = None
            np.asarray(self._starts, dtype=np.int64).tofile(base.with_suffix(".idx"))
            os.replace(base.with_suffix(".bin.partial"), base.with_suffix(".bin"))
        self._starts = array("q")
        self.shards += 1
        write_text_atomic(self.progress_path, json.dumps({"shards": self.shards, "item": item, "offset": offset}))

    def finish(self, extra: dict) -> None:
        """Close the last (short) shard and set `record` (the split's manifest entry, with `extra`)."""
        if self._file is not None or self._starts:
            if self._file is None:
                self._open()
            self._close_shard(-1, 0)
        self.record = {"shards": self.shards, "tokens": self.position, **extra}
        write_text_atomic(self.progress_path, json.dumps({"record": self.record}))


class TokenView:
    """A split's shards seen as one 1-D array of token ids: len(), slices (views) and integer-array indexing
    (a gather, for sampler windows) and np.asarray (a copy: small splits only)."""

    def __init__(self, shards: list[np.ndarray], shard_tokens: int, start: int = 0, stop: int | None = None):
        self.shards, self.shard_tokens = shards, shard_tokens
        total = sum(len(s) for s in shards)
        self.start, self.stop = start, total if stop is None else stop
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("token views take contiguous slices only")
            return TokenView(self.shards, self.shard_tokens, self.start + start, self.start + max(start, stop))
        index = np.asarray(key, dtype=np.int64)
        index = np.where(index < 0, index + len(self), index) + self.start
        shard = index // self.shard_tokens
        out = np.empty(index.shape, dtype=self.dtype)
        for number in np.unique(shard):
            where = shard == number
            out[where] = self.shards[number][index[where] - number * self.shard_tokens]
        return out if out.ndim else out[()]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


def open_split(
    folder: Path, name: str, record: dict, shard_tokens: int, dtype: str, vocab_size: int
) -> np.ndarray | TokenView:
    """The token stream of split `name` (its manifest `record`): a memmap when it is one shard. Each shard's
    largest id is checked against `vocab_size` once here (UserError naming the shard), so a damaged cache
    fails as it opens rather than mid-run."""
    shards = []
    for n in range(record["shards"]):
        path = folder / f"{shard_name(name, n)}.bin"
        shard = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
        if len(shard) and int(shard.max()) >= vocab_size:
            raise UserError(
                f"data.cache_dir: '{path}' holds token id {int(shard.max())}, beyond the cache's {vocab_size}-token "
                "vocabulary: the cache is damaged; delete it to tokenize again"
            )
        shards.append(shard)
    if len(shards) == 1:
        return shards[0]
    return TokenView(shards or [np.zeros(0, dtype=dtype)], shard_tokens)


def document_starts(folder: Path, name: str, record: dict) -> np.ndarray:
    """int64 stream positions at which the documents of split `name` start (ascending)."""
    parts = [np.fromfile(folder / f"{shard_name(name, n)}.idx", dtype=np.int64) for n in range(record["shards"])]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
