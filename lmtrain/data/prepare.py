"""Preparing a corpus: text in bounded pieces → token ids (encoded in parallel, in large batches) → token shards
and a manifest in one cache folder; atomic (the folder appears whole) and resumable (a killed preparation keeps
its finished shards, and its tokenizer, and goes on from there).

Peak memory is bounded by the batch (`num_workers` MB of text and its ids) and the document index of one shard,
not by the corpus. The folder holds tokenizer.json, manifest.json and each split's shards (`lmtrain.data.shards`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import write_text_atomic, writing
from lmtrain.data.encoder import Encoder, token_dtype
from lmtrain.data.shards import ShardWriter
from lmtrain.data.tokenizer import document_framing, end_of_text_id, load_tokenizer

log = logging.getLogger("lmtrain")
MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: each document starts with the tokenizer's own leading tokens (BOS)
BATCH_CHARS_PER_WORKER = 1 << 20  # text per encode call: enough pieces to keep every worker busy
Items = Iterator[tuple[bool, str]]  # (starts_a_document, text piece)


@dataclass
class Split:
    """One token stream to write: its input pieces (a fresh iterator per call, counting skipped records
    into the dict it is given), the config key it came from, and where (for messages)."""

    items: Callable[[dict], Items]
    key: str
    source: str


def workers(num_workers: int | None) -> int:
    """Encoding threads: `num_workers`, or every core this process may use."""
    if num_workers:
        return num_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One process prepares a cache entry at a time; the others wait, then find it finished."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")
    except OSError as err:
        raise UserError(f"data.cache_dir: cannot write to '{folder.parent}': {err.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(
    folder: Path,
    splits: dict[str, Split],
    make_tokenizer: Callable[[], Tokenizer],
    end_of_text: int | None,
    val_fraction: float,
    num_workers: int | None,
    shard_tokens: int,
    describe: dict,
) -> None:
    """Prepare `folder` (nothing to do when its manifest exists). `splits` holds "train" and, when there is a
    validation corpus, "validation"; without one the last `val_fraction` of the train tokens validates."""
    with locked(folder):
        if (folder / MANIFEST).exists():
            return
        partial = folder.parent / f".{folder.name}.partial"
        with writing(partial):
            partial.mkdir(exist_ok=True)
        tokenizer = _tokenizer(partial / "tokenizer.json", make_tokenizer)
        separator = end_of_text if end_of_text is not None else end_of_text_id(tokenizer)
        threads = workers(num_workers)
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # tokenizers' pool, read when it first starts
        batch_chars = threads * BATCH_CHARS_PER_WORKER
        records = {}
        for name, split in splits.items():
            writer = ShardWriter(partial, name, shard_tokens, token_dtype(tokenizer))
            records[name] = _prepared_split(name, split, writer, tokenizer, separator, batch_chars)
        manifest = {
            "format": FORMAT_VERSION,
            "dtype": token_dtype(tokenizer).name,
            "shard_tokens": shard_tokens,
            "splits": records,
            "spans": _spans(records, val_fraction),
            "skipped": {k: v for r in records.values() for k, v in r.pop("skipped", {}).items()},
            **describe,
        }
        write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
        for progress in partial.glob("*.progress.json"):
            progress.unlink()
        os.rename(partial, folder)


def _prepared_split(
    name: str, split: Split, writer: ShardWriter, tokenizer: Tokenizer, separator: int, batch_chars: int
) -> dict:
    """The manifest record of split `name`, written into shards unless an earlier preparation finished it;
    raises UserError when the split holds no text."""
    if writer.record is None:
        skipped: dict[str, int] = {}
        encoder = Encoder(tokenizer, split.key)
        _write_split(split.items(skipped), encoder, separator, writer, batch_chars, name)
        encoder.finish()
        writer.finish({"skipped": skipped})
    assert writer.record is not None, "a finished split has its record"
    record = writer.record
    if record["tokens"] == 0:
        bad = sum(record.get("skipped", {}).values())
        why = f"{bad} records skipped for a null, missing or non-text field, " if bad else ""
        raise UserError(f"{split.key}: '{split.source}' holds no text ({why}every other record empty)")
    return record


def _spans(records: dict[str, dict], val_fraction: float) -> dict[str, list]:
    """Each split's stream as [shard split, first token, end token]: without a validation corpus the last
    `val_fraction` of the train tokens validates."""
    num_train = records["train"]["tokens"]
    if "validation" in records:
        return {"train": ["train", 0, num_train], "validation": ["validation", 0, records["validation"]["tokens"]]}
    cut = num_train - int(num_train * val_fraction)
    return {"train": ["train", 0, cut], "validation": ["train", cut, num_train]}


def _tokenizer(path: Path, make_tokenizer: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer a preparation uses: trained once, kept in the partial folder across restarts."""
    if path.exists():
        return load_tokenizer(str(path))
    started = time.perf_counter()
    tokenizer = make_tokenizer()
    log.info("tokenizer: ready in %.1f s (vocabulary %d)", time.perf_counter() - started, tokenizer.get_vocab_size())
    write_text_atomic(path, tokenizer.to_str())
    return tokenizer


def _write_split(items: Items, encoder: Encoder, separator: int, writer: ShardWriter, batch_chars: int, name: str):
    """Encode `items` in batches on a background thread (the next batch is read, and the last one written,
    while one encodes) and append their ids to `writer`, `separator` before every document but the first and
    the tokenizer's own leading tokens (BOS) before every document (`document_framing`)."""
    first_item, first_offset = writer.resume_at
    starts_ids = [np.array(ids, dtype=encoder.dtype) for ids in document_framing(encoder.tokenizer, separator)]
    started, done = time.perf_counter(), 0

    def batches() -> Iterator[list]:
        batch, chars = [], 0
        for index, (starts, text) in enumerate(items):
            if index < first_item:  # shards already written hold these
                continue
            batch.append((index, starts, text))
            chars += len(text)
            if chars >= batch_chars:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    def encode(batch: list) -> tuple[list, list[np.ndarray]]:
        return batch, encoder.encode([text for _, _, text in batch])

    def write(batch: list, encoded: list[np.ndarray]) -> None:
        nonlocal done
        for (index, starts, text), ids in zip(batch, encoded, strict=True):
            if starts:
                ids = np.concatenate([starts_ids[index > 0], ids])
            offset = first_offset if index == first_item else 0
            writer.add(ids[offset:], index, offset, starts and offset == 0)
            size = len(text.encode())
            done += size
            bar.update(size)

    with (
        tqdm(desc=f"tokenizing {name}", unit="B", unit_scale=True, leave=False, disable=None) as bar,
        ThreadPoolExecutor(1) as pool,
    ):
        pending: deque = deque()
        for batch in batches():
            pending.append(pool.submit(encode, batch))
            if len(pending) > 1:
                write(*pending.popleft().result())
        while pending:
            write(*pending.popleft().result())
    seconds = time.perf_counter() - started
    if done:
        log.info("%s: %.1f MB tokenized in %.1f s (%.1f MB/s)", name, done / 1e6, seconds, done / 1e6 / seconds)
