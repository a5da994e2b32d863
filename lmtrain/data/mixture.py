"""Mixtures of corpora (data=mixture): one tokenizer shared by every source, each source prepared into its own
token cache, and a sampler that draws each step's windows from the sources in proportion to their weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import write_text_atomic
from lmtrain.data import corpus, tokens
from lmtrain.data.prepare import locked
from lmtrain.data.tokenizer import build_tokenizer, end_of_text_id, load_tokenizer

if TYPE_CHECKING:  # torch is imported where it is used: `lmtrain prepare` never loads it
    import torch


@dataclass
class Source:
    name: str  # in metrics: val_<name>_loss, epochs_<name>
    weight: float  # normalised: the share of windows drawn from it
    data: tokens.TokenData


def source_names(sources: list) -> list[str]:
    """Each source's `name`, else its path's stem ("web/" → web); UserError for duplicates."""
    names = [s.name or Path(s.path.rstrip("/")).stem or s.path for s in sources]
    for number, name in enumerate(names):
        if names.index(name) != number:
            raise UserError(f"data.sources[{number}]: a second source named '{name}'; give each a distinct name")
    return names


def _interleaved(iterators: list):
    """Items taken from each iterator in turn until all are done: a tokenizer sample that sees every source."""
    iterators = list(iterators)
    while iterators:
        for it in list(iterators):
            item = next(it, None)
            if item is None:
                iterators.remove(it)
            else:
                yield item


def shared_tokenizer(sources: list, settings: dict) -> Tokenizer:
    """One tokenizer for all sources (data.tokenizer, trained on a sample taken from each source in turn),
    cached under cache_dir/tokenizers/ by the sources' content and the tokenizer settings."""
    kind = settings["tokenizer"]
    if kind == "byte":
        return build_tokenizer("byte", [], 0)
    files = [corpus.resolve_files(s.path, f"data.sources[{n}].path") for n, s in enumerate(sources)]
    parts = {
        "sources": [corpus.fingerprint(s.path, f) for s, f in zip(sources, files, strict=True)],
        **{k: settings[k] for k in ("tokenizer", "text_field", "max_chars", "on_bad_record")},
        "bpe": [settings["vocab_size"], settings["tokenizer_sample_chars"]] if kind == "bpe" else None,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(settings["cache_dir"]).expanduser() / "tokenizers" / key / "tokenizer.json"
    with locked(path.parent):
        if not path.exists():
            items = [
                tokens.capped(
                    corpus.iter_pieces(s.path, f, settings["text_field"], f"data.sources[{n}].path"),
                    settings["max_chars"],
                )
                for n, (s, f) in enumerate(zip(sources, files, strict=True))
            ]
            texts = (text for _, text in _interleaved(items))
            if kind == "bpe":
                texts = tokens.sampled(texts, settings["tokenizer_sample_chars"])
            tokenizer = build_tokenizer(kind, texts, settings["vocab_size"])
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, tokenizer.to_str())
    return load_tokenizer(str(path))


def prepare(sources: list, settings: dict, existing: Tokenizer | None, end_of_text: int | None) -> list[Source]:
    """Every source tokenized with one tokenizer (`existing`, else `shared_tokenizer`): `settings` are the
    corpus settings of the data config; a source's own path replaces train, and its tail validates it."""
    names = source_names(sources)
    tokenizer = existing or shared_tokenizer(sources, settings)
    separator = end_of_text if existing is not None else end_of_text_id(tokenizer)
    total = sum(s.weight for s in sources)
    prepared = []
    for number, (source, name) in enumerate(zip(sources, names, strict=True)):
        if not source.weight > 0:
            raise UserError(f"data.sources[{number}].weight: must be > 0, got {source.weight}")
        mine = {**settings, "train": source.path, "validation": None}
        try:
            data = tokens.prepare(**mine, existing=tokenizer, end_of_text=separator)
        except UserError as err:
            raise UserError(str(err).replace("data.train", f"data.sources[{number}].path")) from None
        prepared.append(Source(name, source.weight / total, data))
    return prepared


class MixtureSampler:
    """Each step's windows come from the sources in proportion to their weights: every window's source is drawn
    (multinomial over the weights), then its start within that source, all by one seeded generator whose state
    is saved with the windows drawn from each source, so a resumed run draws exactly what it would have."""

    def __init__(self, samplers: list[tokens.WindowSampler], names: list[str], weights: list[float], seed: int):
        import torch

        self.samplers, self.names = samplers, names
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        for sampler in samplers:  # one generator draws for all: the sources' own are not used
            sampler.generator = self.generator
        self.seq_len = samplers[0].seq_len

    def next_step(
        self, num_micro_batches: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As `WindowSampler.next_step`, windows drawn from the mixture."""
        import torch

        count = num_micro_batches * micro_batch_size
        which = torch.multinomial(self.weights, count * world_size, replacement=True, generator=self.generator)
        windows = torch.empty(count * world_size, self.seq_len + 1, dtype=torch.int64)
        for number, sampler in enumerate(self.samplers):
            chosen = (which == number).nonzero().flatten()
            if len(chosen):
                starts = sampler.draw(len(chosen))  # all processes' windows, so every process keeps in step
                mine = (chosen >= rank * count) & (chosen < (rank + 1) * count)
                windows[chosen[mine]] = sampler.windows_at(starts[mine.numpy()])
        windows = windows[rank * count : (rank + 1) * count]
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(micro_batch_size)]

    def accounting(self) -> dict[str, float]:
        """Training tokens drawn from each source and epochs over each."""
        record: dict[str, float] = {}
        for name, sampler in zip(self.names, self.samplers, strict=True):
            record[f"tokens_{name}"] = int(sampler.windows) * self.seq_len
            record[f"epochs_{name}"] = sampler.accounting()["epochs"]
        return record

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"generator": self.generator.get_state()}
        state.update({f"windows_{n}": s.windows.clone() for n, s in enumerate(self.samplers)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        for number, sampler in enumerate(self.samplers):
            sampler.windows = state[f"windows_{number}"].clone()


def validation_sets(sources: list[Source], seq_len: int, num_batches: int, batch_size: int) -> dict[str, list]:
    """Each source's fixed validation windows, by name."""
    return {s.name: tokens.validation_batches(s.data.validation, seq_len, num_batches, batch_size) for s in sources}


def weighted_loss(losses: dict[str, float], sources: list[Source]) -> float:
    """The mixture's validation loss: the sources' losses weighted as training draws them."""
    return float(np.dot([losses[s.name] for s in sources], [s.weight for s in sources]))
