"""Text to token-id arrays, fast: a vectorised lookup for lmtrain's char and byte tokenizers (the same ids
as `tokenizers`, 20-190x faster), `Tokenizer.encode_batch` (multi-threaded) for everything else."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
from tokenizers import Tokenizer

from lmtrain.data.tokenizer import CODEPOINTS, UNKNOWN, _byte_symbols, codepoints, warn_unknown

log = logging.getLogger("lmtrain")
_CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False}


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32: what token files store."""
    return np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32)


class Encoder:
    """Encodes a batch of texts to id arrays (`token_dtype`), without special tokens.

    The char tokenizer (WordLevel over single characters) and the byte tokenizer (UTF-8 bytes, no merges)
    are recognised from their tokenizer.json and encoded by table lookup; `finish()` warns about characters
    the char tokenizer maps to <|unk|>, as `warn_unknown` does."""

    def __init__(self, tokenizer: Tokenizer, key: str):
        self.tokenizer, self.key = tokenizer, key
        self.dtype = token_dtype(tokenizer)
        spec = json.loads(tokenizer.to_str())
        self._table: np.ndarray | None = None
        self._unknown_seen: np.ndarray | None = None
        self.encode: Callable[[list[str]], list[np.ndarray]] = self._library
        if _is_char(spec):
            self._table = np.full(CODEPOINTS, tokenizer.token_to_id(UNKNOWN), dtype=self.dtype)
            for token, token_id in spec["model"]["vocab"].items():
                if len(token) == 1:
                    self._table[ord(token)] = token_id
            self._unknown_seen = np.zeros(CODEPOINTS, dtype=bool)
            self.encode = self._chars
        elif _is_byte(spec):
            self.encode = self._bytes

    def _library(self, texts: list[str]) -> list[np.ndarray]:
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)  # fast: no offsets
        encodings = encode_batch(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=self.dtype) for e in encodings]

    def _chars(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        unknown = self.tokenizer.token_to_id(UNKNOWN)
        table, seen = self._table, self._unknown_seen
        assert table is not None and seen is not None, "set up for a character tokenizer"
        for text in texts:
            points = codepoints(text)
            ids = table[points]
            seen[points[ids == unknown]] = True
            out.append(ids)
        return out

    def _bytes(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.dtype) for text in texts]

    def finish(self) -> None:
        if self._unknown_seen is not None and self._unknown_seen.any():
            warn_unknown(self.tokenizer, ["".join(chr(c) for c in np.flatnonzero(self._unknown_seen))], self.key)


def _is_char(spec: dict) -> bool:
    model = spec.get("model") or {}
    return (
        model.get("type") == "WordLevel"
        and spec.get("normalizer") is None
        and spec.get("pre_tokenizer") == _CHAR_SPLIT
        and UNKNOWN in model.get("vocab", {})
    )


def _is_byte(spec: dict) -> bool:
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    return (
        model.get("type") == "BPE"
        and not model.get("merges")
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex") is False
        and model.get("vocab") == {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    )
