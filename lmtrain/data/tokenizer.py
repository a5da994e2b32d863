"""Tokenizers built on Hugging Face `tokenizers`: char-level, byte-level, or a trained byte-level BPE.
All three save as one `tokenizer.json` and decode losslessly."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"


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


def bpe_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts` to `vocab_size` entries (GPT-2 style)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if kind == "byte":
        return byte_tokenizer()
    if kind == "char":
        return char_tokenizer(texts)
    if kind == "bpe":
        return bpe_tokenizer(iter(texts), vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}")


def end_of_text_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(END_OF_TEXT)
