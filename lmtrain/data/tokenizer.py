"""Tokenizers built on Hugging Face `tokenizers`: char-level, byte-level, or a trained byte-level BPE.
All three save as one `tokenizer.json`; byte and BPE decode losslessly, char maps unseen characters to
<|unk|> (with a warning). User text is always plain text: only lmtrain inserts special tokens."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger("lmtrain")
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"
MAX_PIECE = 64  # BPE pieces longer than this many bytes are split: merges cost ~quadratic time in piece length
_UNBROKEN = re.compile(r"\S{10000}")


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the alphabet of ByteLevel)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte: token id = byte value; id 256 separates documents."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One token per character seen in `texts` (sorted), plus unknown and end-of-text tokens."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    vocab[UNKNOWN] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([UNKNOWN, END_OF_TEXT])  # special: decoding skips them
    return tokenizer


def _warn_unbroken(texts: Iterator[str]) -> Iterator[str]:
    warned = False
    for text in texts:
        if not warned and _UNBROKEN.search(text):
            log.warning(
                "data.train holds runs of 10,000+ characters without a space or line break (minified code, "
                "base64?); BPE learns from them in pieces of %d bytes",
                MAX_PIECE,
            )
            warned = True
        yield text


def bpe_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts` to `vocab_size` entries (GPT-2 style; pieces of at most
    MAX_PIECE bytes, so training stays linear in the length of unbroken lines)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Split(Regex(f".{{1,{MAX_PIECE}}}"), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_warn_unbroken(texts), trainer=trainer)
    return tokenizer


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if kind == "byte":
        return plain_text(byte_tokenizer())
    if kind == "char":
        return plain_text(char_tokenizer(texts))
    if kind == "bpe":
        return plain_text(bpe_tokenizer(iter(texts), vocab_size))
    raise ValueError(f"unknown tokenizer {kind!r}")


def plain_text(tokenizer: Tokenizer) -> Tokenizer:
    """Encode the spelling of a special token in user text ("<|endoftext|>") as text, not as the token.
    tokenizer.json does not keep this setting: every loaded tokenizer passes through here."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    return plain_text(Tokenizer.from_file(path))


_warned: set[str] = set()


def unknown_chars(tokenizer: Tokenizer, texts: Iterable[str]) -> list[str]:
    """The characters of `texts` a char-level tokenizer maps to <|unk|> (none for byte and BPE)."""
    vocab = tokenizer.get_vocab()
    if UNKNOWN not in vocab:
        return []
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    return sorted(c for c in seen if c not in vocab)


def warn_unknown(tokenizer: Tokenizer, texts: Iterable[str], where: str) -> None:
    """Warn, once per character and process, about characters the tokenizer cannot represent."""
    new = [c for c in unknown_chars(tokenizer, texts) if c not in _warned]
    if new:
        _warned.update(new)
        shown = " ".join(repr(c) for c in new[:20]) + (f" and {len(new) - 20} more" if len(new) > 20 else "")
        log.warning("%s: the char tokenizer has no entry for %s; they become <|unk|> and are lost", where, shown)


def end_of_text_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(END_OF_TEXT)
