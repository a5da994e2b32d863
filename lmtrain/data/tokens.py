"""Packed token files: the corpus tokenized once into memory-mapped token shards, cached by content + tokenizer
(`lmtrain.data.prepare` writes them); and the samplers that cut training and validation windows out of them."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from lmtrain.core.errors import UserError
from lmtrain.data import corpus
from lmtrain.data.prepare import FORMAT_VERSION, MANIFEST, Split, build
from lmtrain.data.shards import TokenView, document_starts, open_split
from lmtrain.data.tokenizer import build_tokenizer, load_tokenizer

if TYPE_CHECKING:  # torch is imported where it is used: `lmtrain prepare` never loads it
    import torch

log = logging.getLogger("lmtrain")


@dataclass
class TokenData:
    train: np.ndarray | TokenView  # 1-D token ids: a memmap, or a view over several shards
    validation: np.ndarray | TokenView
    tokenizer: Tokenizer
    cache_path: Path
    skipped: dict[str, int]  # data key -> records skipped for a missing, null or non-text field
    train_documents: np.ndarray | None = None  # int64 positions in `train` where a document starts


def capped(items, max_chars: int | None):
    """The (starts_a_document, piece) items of at most `max_chars` characters in all, the last one cut."""
    total = 0
    for starts, text in items:
        if max_chars is not None and total + len(text) > max_chars:
            if total < max_chars:
                yield starts, text[: max_chars - total]
            return
        total += len(text)
        yield starts, text


def sampled(texts, max_chars: int | None):
    """The first `max_chars` characters of `texts` (all with None): what a BPE tokenizer learns from."""
    total = 0
    for text in texts:
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield text


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
    "tokenizer_sample_chars",
    "num_workers",
    "shard_tokens",
)


def corpus_settings(data: object) -> dict:
    """The CORPUS_KEYS of a data config, as keyword arguments for `prepare` or `cached_tokenizer`."""
    return {key: getattr(data, key) for key in CORPUS_KEYS}


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Corpus:
    """Where a corpus is read from and how it is tokenized: everything its cache entry depends on (and how
    fast it is prepared: num_workers and shard_tokens change the files' layout, never the tokens)."""

    train: str
    validation: str | None
    val_fraction: float
    text_field: str
    tokenizer: str
    vocab_size: int
    max_chars: int | None
    cache_dir: str
    on_bad_record: str
    tokenizer_sample_chars: int | None
    num_workers: int | None
    shard_tokens: int
    existing: Tokenizer | None = None
    end_of_text: int | None = None

    def files(self) -> tuple[list[Path] | None, list[Path] | None]:
        train = corpus.resolve_files(self.train, "data.train")
        return train, corpus.resolve_files(self.validation, "data.validation") if self.validation else None

    def folder(self, train_files, val_files) -> Path:
        """The cache entry: a hash of the files' content and every setting that changes the tokens."""
        existing = self.existing
        trains_bpe = self.tokenizer == "bpe" and existing is None
        parts = {
            "format": FORMAT_VERSION,
            "train": corpus.fingerprint(self.train, train_files),
            "validation": corpus.fingerprint(self.validation, val_files) if self.validation else None,
            "val_fraction": None if self.validation else self.val_fraction,
            "text_field": self.text_field,
            "tokenizer": self.tokenizer if existing is None else hashlib.sha256(existing.to_str().encode()).hexdigest(),
            "vocab_size": self.vocab_size if trains_bpe else None,
            "end_of_text": self.end_of_text,
            "max_chars": self.max_chars,
            **({"on_bad_record": self.on_bad_record} if self.on_bad_record != "skip" else {}),
            **({"tokenizer_sample_chars": self.tokenizer_sample_chars} if trains_bpe else {}),
        }
        return Path(self.cache_dir).expanduser() / _cache_key(parts)


def prepare(**settings) -> TokenData:
    """Tokenize the corpus once into `cache_dir/<key>/` (tokenizer.json, manifest.json, token shards) and map
    it; `settings` are the fields of `Corpus`.

    With `existing` (a pretrained model's tokenizer, whose document separator is `end_of_text`) no tokenizer
    is trained: `tokenizer` and `vocab_size` are not used."""
    c = Corpus(**settings)
    train_files, val_files = c.files()
    folder = c.folder(train_files, val_files)
    if not (folder / MANIFEST).exists():
        _build(c, folder, train_files, val_files)
    data = _load(folder)
    for key, count in data.skipped.items():
        log.warning("%s: skipped %d records whose '%s' is missing, null or not text", key, count, c.text_field)
    return data


def cached_tokenizer(**settings) -> Tokenizer | None:
    """The tokenizer `prepare(**settings)` would use, if that corpus is already tokenized in the cache."""
    c = Corpus(**settings)
    folder = c.folder(*c.files())
    return load_tokenizer(str(folder / "tokenizer.json")) if (folder / MANIFEST).exists() else None


def _build(c: Corpus, folder: Path, train_files, val_files) -> None:
    def train_items(skipped: dict) -> Iterator[tuple[bool, str]]:
        items = corpus.iter_pieces(c.train, train_files, c.text_field, "data.train", c.on_bad_record, skipped)
        return capped(items, c.max_chars)

    def make_tokenizer() -> Tokenizer:
        texts = (text for _, text in train_items({}))
        if c.tokenizer == "bpe":
            texts = sampled(texts, c.tokenizer_sample_chars)
        return build_tokenizer(c.tokenizer, texts, c.vocab_size)

    splits = {"train": Split(train_items, "data.train", c.train)}
    if c.validation:
        validation = c.validation

        def validation_items(skipped: dict) -> Iterator[tuple[bool, str]]:
            key = "data.validation"
            return corpus.iter_pieces(validation, val_files, c.text_field, key, c.on_bad_record, skipped)

        splits["validation"] = Split(validation_items, "data.validation", c.validation)
    existing = c.existing

    def given_tokenizer() -> Tokenizer:
        assert existing is not None
        return existing

    build(
        folder,
        splits,
        given_tokenizer if existing is not None else make_tokenizer,
        c.end_of_text,
        c.val_fraction,
        c.num_workers,
        c.shard_tokens,
        {"train_source": c.train},
    )


def _load(folder: Path) -> TokenData:
    manifest = json.loads((folder / MANIFEST).read_text())
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    streams = {
        name: open_split(folder, name, record, manifest["shard_tokens"], manifest["dtype"], vocab)
        for name, record in manifest["splits"].items()
    }
    (train_split, train_start, train_stop), (val_split, val_start, val_stop) = (
        manifest["spans"]["train"],
        manifest["spans"]["validation"],
    )
    starts = document_starts(folder, "train", manifest["splits"]["train"])
    return TokenData(
        train=streams[train_split][train_start:train_stop],
        validation=streams[val_split][val_start:val_stop],
        tokenizer=tokenizer,
        cache_path=folder,
        skipped=manifest.get("skipped", {}),
        train_documents=starts[starts < train_stop - train_start],
    )


class WindowSampler:
    """Random contiguous windows of `seq_len + 1` tokens, drawn by a seeded generator whose state is saved.

    With `starts` (int64 token positions: document starts, for data.window=bos_aligned) a window begins only
    at one of them; otherwise anywhere. All windows of one optimizer step are drawn at once and then cut into
    micro-batches, so accumulating 4 micro-batches of 4 sees exactly the windows of one batch of 16.
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenView,
        seq_len: int,
        seed: int,
        starts: np.ndarray | None = None,
        key="data.train",
    ):
        import torch

        if len(tokens) < seq_len + 2:
            raise UserError(
                f"{key}: {len(tokens)} training tokens are too few for model.max_seq_len={seq_len}; "
                "use more text or a shorter context"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(seq_len + 1)
        self.starts = None if starts is None else starts[starts <= len(tokens) - seq_len - 1]
        if self.starts is not None and not len(self.starts):
            raise UserError(f"data.window=bos_aligned: no document of {key} starts {seq_len + 1} tokens before its end")
        self.windows = torch.zeros((), dtype=torch.int64)  # windows drawn so far, all processes

    def draw(self, count: int) -> np.ndarray:
        """`count` window start positions, int64."""
        import torch

        self.windows += count
        if self.starts is None:
            return torch.randint(len(self.tokens) - self.seq_len, (count,), generator=self.generator).numpy()
        return self.starts[torch.randint(len(self.starts), (count,), generator=self.generator).numpy()]

    def windows_at(self, starts: np.ndarray) -> torch.Tensor:
        """int64 [len(starts), seq_len + 1]: the windows beginning at `starts`."""
        import torch

        return torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))

    def next_step(
        self, num_micro_batches: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Inputs and targets, each int64 [micro_batch_size, seq_len], for this process's micro-batches of
        one step. Every process draws the windows of all processes and keeps its own slice, so N processes
        see exactly what one process with the same global batch would."""
        count = num_micro_batches * micro_batch_size
        starts = self.draw(count * world_size)[rank * count : (rank + 1) * count]
        return [(w[:, :-1], w[:, 1:]) for w in self.windows_at(starts).split(micro_batch_size)]

    def accounting(self) -> dict[str, float]:
        """Token-exact progress through the data: epochs over the train split (input tokens drawn / its tokens)."""
        return {"epochs": int(self.windows) * self.seq_len / len(self.tokens)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "windows": self.windows.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self.generator.set_state(state["generator"])
        self.windows = state.get("windows", torch.zeros((), dtype=torch.int64)).clone()


def with_documents(batch: tuple[torch.Tensor, torch.Tensor], end_of_text: int) -> tuple[dict, torch.Tensor]:
    """A window batch with document_ids [B, T] for document masking: an end-of-text token opens the next
    document, so the first token after it is predicted from it alone."""
    inputs, targets = batch
    return {"tokens": inputs, "document_ids": (inputs == end_of_text).cumsum(dim=1)}, targets


def validation_batches(
    tokens: np.ndarray | TokenView, seq_len: int, num_batches: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of windows spread evenly over the validation tokens (the same at every evaluation)."""
    import torch

    if len(tokens) < seq_len + 1:
        raise UserError(
            f"data.validation: {len(tokens)} validation tokens are too few for model.max_seq_len={seq_len}; "
            "raise data.val_fraction or give a longer data.validation"
        )
    count = num_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).round().astype(np.int64)
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
