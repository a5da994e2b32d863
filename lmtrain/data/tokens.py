"""Packed token files: the corpus tokenized once into a memory-mapped file, cached by content + tokenizer;
and the samplers that cut training and validation windows out of it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from lmtrain.data import corpus
from lmtrain.data.tokenizer import UNKNOWN, build_tokenizer, end_of_text_id, load_tokenizer, warn_unknown
from lmtrain.errors import UserError
from lmtrain.safe_io import writing

log = logging.getLogger("lmtrain")

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces cut at line ends


@dataclass
class TokenData:
    train: np.ndarray  # 1-D memmap of token ids
    validation: np.ndarray
    tokenizer: Tokenizer
    cache_path: Path
    skipped: dict[str, int]  # data key -> records skipped for a missing, null or non-text field


def _pieces(document: str) -> list[str]:
    if len(document) <= CHUNK_CHARS:
        return [document]
    pieces, start = [], 0
    while start < len(document):
        end = document.find("\n", start + CHUNK_CHARS)
        end = len(document) if end < 0 else end + 1
        pieces.append(document[start:end])
        start = end
    return pieces


def _capped(documents, max_chars: int | None):
    total = 0
    for document in documents:
        if max_chars is not None and total + len(document) > max_chars:
            if total < max_chars:
                yield document[: max_chars - total]
            return
        total += len(document)
        yield document


def _write_tokens(documents, tokenizer: Tokenizer, end_of_text: int, out, desc: str, key: str) -> int:
    """Encode documents in batches (tokenizers encodes a batch in parallel) and append ids to `out`, with
    `end_of_text` between documents."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    separator = np.array([end_of_text], dtype=dtype)
    count, first = 0, True
    documents = iter(documents)
    chars: set[str] | None = set() if tokenizer.token_to_id(UNKNOWN) is not None else None
    with tqdm(desc=desc, unit="doc", leave=False, disable=None) as bar:
        while batch := list(islice(documents, 256)):
            for document in batch:
                if chars is not None:
                    chars.update(document)
                if not first:
                    out.write(separator.tobytes())
                    count += 1
                first = False
                for encoding in tokenizer.encode_batch(_pieces(document), add_special_tokens=False):
                    ids = np.asarray(encoding.ids, dtype=dtype)
                    out.write(ids.tobytes())
                    count += len(ids)
            bar.update(len(batch))
    if chars:
        warn_unknown(tokenizer, ["".join(chars)], key)
    return count


# the data settings `prepare` reads (the pretraining data config holds more: seq_len, document_masking)
CORPUS_KEYS = (
    "train",
    "validation",
    "val_fraction",
    "text_field",
    "tokenizer",
    "vocab_size",
    "max_chars",
    "cache_dir",
    "on_bad_record",
)


def corpus_settings(data: object) -> dict:
    """The CORPUS_KEYS of a data config, as keyword arguments for `prepare` or `cached_tokenizer`."""
    return {key: getattr(data, key) for key in CORPUS_KEYS}


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Corpus:
    """Where a corpus is read from and how it is tokenized: everything its cache entry depends on."""

    train: str
    validation: str | None
    val_fraction: float
    text_field: str
    tokenizer: str
    vocab_size: int
    max_chars: int | None
    cache_dir: str
    existing: Tokenizer | None = None
    end_of_text: int | None = None
    on_bad_record: str = "skip"

    def files(self) -> tuple[list[Path] | None, list[Path] | None]:
        train = corpus.resolve_files(self.train, "data.train")
        return train, corpus.resolve_files(self.validation, "data.validation") if self.validation else None

    def folder(self, train_files, val_files) -> Path:
        """The cache entry: a hash of the files' content and every setting that changes the tokens."""
        existing = self.existing
        parts = {
            "format": FORMAT_VERSION,
            "train": corpus.fingerprint(self.train, train_files),
            "validation": corpus.fingerprint(self.validation, val_files) if self.validation else None,
            "val_fraction": None if self.validation else self.val_fraction,
            "text_field": self.text_field,
            "tokenizer": self.tokenizer if existing is None else hashlib.sha256(existing.to_str().encode()).hexdigest(),
            "vocab_size": self.vocab_size if self.tokenizer == "bpe" and existing is None else None,
            "end_of_text": self.end_of_text,
            "max_chars": self.max_chars,
            **({"on_bad_record": self.on_bad_record} if self.on_bad_record != "skip" else {}),
        }
        return Path(self.cache_dir).expanduser() / _cache_key(parts)


def prepare(**settings) -> TokenData:
    """Tokenize the corpus once into `cache_dir/<key>/` (tokenizer.json, tokens.bin, meta.json) and map it;
    `settings` are the fields of `Corpus`.

    With `existing` (a pretrained model's tokenizer, whose document separator is `end_of_text`) no tokenizer
    is trained: `tokenizer` and `vocab_size` are not used."""
    c = Corpus(**settings)
    train_files, val_files = c.files()
    folder = c.folder(train_files, val_files)
    if not (folder / "meta.json").exists():
        _build(
            folder,
            c.train,
            train_files,
            c.validation,
            val_files,
            c.val_fraction,
            c.text_field,
            c.tokenizer,
            c.vocab_size,
            c.max_chars,
            c.existing,
            c.end_of_text,
            c.on_bad_record,
        )
    data = _load(folder)
    for key, count in data.skipped.items():
        log.warning("%s: skipped %d records whose '%s' is missing, null or not text", key, count, c.text_field)
    return data


def cached_tokenizer(**settings) -> Tokenizer | None:
    """The tokenizer `prepare(**settings)` would use, if that corpus is already tokenized in the cache."""
    c = Corpus(**settings)
    folder = c.folder(*c.files())
    return load_tokenizer(str(folder / "tokenizer.json")) if (folder / "meta.json").exists() else None


def _build(
    folder,
    train,
    train_files,
    validation,
    val_files,
    val_fraction,
    text_field,
    kind,
    vocab_size,
    max_chars,
    existing,
    end_of_text,
    on_bad,
):
    skipped: dict[str, int] = {}

    def train_documents(counts=None):
        documents = corpus.iter_documents(train, train_files, text_field, "data.train", on_bad, counts)
        return _capped(documents, max_chars)

    tokenizer = existing or build_tokenizer(kind, train_documents(), vocab_size)
    separator = end_of_text if end_of_text is not None else end_of_text_id(tokenizer)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as err:
        raise UserError(f"data.cache_dir: cannot write to '{folder.parent}': {err.strerror}") from None
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        with writing(folder / "tokens.bin"), open(staging / "tokens.bin", "wb") as out:
            num_train = _write_tokens(
                train_documents(skipped), tokenizer, separator, out, "tokenizing train", "data.train"
            )
            num_val = 0
            if validation:
                documents = corpus.iter_documents(validation, val_files, text_field, "data.validation", on_bad, skipped)
                num_val = _write_tokens(
                    documents, tokenizer, separator, out, "tokenizing validation", "data.validation"
                )
        if num_train == 0:
            raise UserError(f"data.train: '{train}' holds no text")
        if validation and num_val == 0:
            raise UserError(f"data.validation: '{validation}' holds no text")
        if validation:
            spans = {"train": [0, num_train], "validation": [num_train, num_train + num_val]}
        else:
            split = num_train - int(num_train * val_fraction)
            spans = {"train": [0, split], "validation": [split, num_train]}
        dtype = "uint16" if tokenizer.get_vocab_size() <= 1 << 16 else "uint32"
        tokenizer.save(str(staging / "tokenizer.json"))
        meta = {"dtype": dtype, **spans, "train_source": train, "skipped": skipped}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same cache entry first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return TokenData(
        train=tokens[slice(*meta["train"])],
        validation=tokens[slice(*meta["validation"])],
        tokenizer=load_tokenizer(str(folder / "tokenizer.json")),
        cache_path=folder,
        skipped=meta.get("skipped", {}),
    )


class WindowSampler:
    """Random contiguous windows of `seq_len + 1` tokens, drawn by a seeded generator whose state is saved.

    All windows of one optimizer step are drawn at once and then cut into micro-batches, so accumulating
    4 micro-batches of 4 sees exactly the windows of one batch of 16.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise UserError(
                f"data.train: {len(tokens)} training tokens are too few for model.max_seq_len={seq_len}; "
                "use more text or a shorter context"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(seq_len + 1)

    def next_step(
        self, num_micro_batches: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Inputs and targets, each int64 [micro_batch_size, seq_len], for this process's micro-batches of
        one step. Every process draws the windows of all processes and keeps its own slice, so N processes
        see exactly what one process with the same global batch would."""
        count = num_micro_batches * micro_batch_size
        drawn = torch.randint(len(self.tokens) - self.seq_len, (count * world_size,), generator=self.generator)
        starts = drawn[rank * count : (rank + 1) * count].numpy()
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(micro_batch_size)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def with_documents(batch: tuple[torch.Tensor, torch.Tensor], end_of_text: int) -> tuple[dict, torch.Tensor]:
    """A window batch with document_ids [B, T] for document masking: an end-of-text token opens the next
    document, so the first token after it is predicted from it alone."""
    inputs, targets = batch
    return {"tokens": inputs, "document_ids": (inputs == end_of_text).cumsum(dim=1)}, targets


def validation_batches(
    tokens: np.ndarray, seq_len: int, num_batches: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of windows spread evenly over the validation tokens (the same at every evaluation)."""
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"data.validation: {len(tokens)} validation tokens are too few for model.max_seq_len={seq_len}; "
            "raise data.val_fraction or give a longer data.validation"
        )
    count = num_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).round().astype(np.int64)
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
