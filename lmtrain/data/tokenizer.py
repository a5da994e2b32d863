"""Tokenizers built on Hugging Face `tokenizers`: char-level, byte-level, or a trained byte-level BPE.
All three save as one `tokenizer.json`; byte and BPE decode losslessly, char maps unseen characters to
<|unk|> (with a warning). User text is always plain text: only lmtrain inserts special tokens."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import read_folder_json, read_folder_text

log = logging.getLogger("lmtrain")
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"
MAX_PIECE = 64  # BPE pieces longer than this many characters are split: merges cost ~quadratic time in piece length
# GPT-2's pre-tokenizer pattern (the one ByteLevel applies) with each run bounded to MAX_PIECE characters: the same
# pieces for ordinary text, in one pass (a second splitting pass cost training a quarter more time)
BOUNDED_GPT2_SPLIT = (
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}{{1,{MAX_PIECE}}}| ?\p{{N}}{{1,{MAX_PIECE}}}"
    rf"| ?[^\s\p{{L}}\p{{N}}]{{1,{MAX_PIECE}}}|\s{{1,{MAX_PIECE}}}(?!\S)|\s{{1,{MAX_PIECE}}}"
)
TRAIN_PIECE_CHARS = 4096  # BPE training reads its text in pieces of about this many characters (to a line end)
_UNBROKEN = re.compile(r"\S{10000}")
CODEPOINTS = 0x110000  # Unicode code points


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of `text`, uint32 [len(text)]."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def char_vocabulary(texts: Iterable[str]) -> list[str]:
    """The distinct characters of `texts`, sorted (a flag per code point: no Python set of characters)."""
    seen = np.zeros(CODEPOINTS, dtype=bool)
    for text in texts:
        seen[codepoints(text)] = True
    return [chr(c) for c in np.flatnonzero(seen)]


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
    vocab = {ch: i for i, ch in enumerate(char_vocabulary(texts))}
    vocab[UNKNOWN] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([UNKNOWN, END_OF_TEXT])  # special: decoding skips them
    return tokenizer


def _training_pieces(texts: Iterator[str]) -> Iterator[str]:
    """`texts` cut at line ends into pieces of about TRAIN_PIECE_CHARS: the trainer counts words in parallel
    per piece (a 1 MB piece keeps a core busy alone); warns once of unbroken runs, which BPE learns in parts."""
    warned = False
    for text in texts:
        if not warned and _UNBROKEN.search(text):
            log.warning(
                "data.train holds runs of 10,000+ characters without a space or line break (minified code, "
                "base64?); BPE learns from them in pieces of %d characters",
                MAX_PIECE,
            )
            warned = True
        start = 0
        while start < len(text):
            end = text.find("\n", start + TRAIN_PIECE_CHARS) + 1 or len(text)
            yield text[start:end]
            start = end


def bpe_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts` to `vocab_size` entries (GPT-2 style; runs of letters, digits,
    punctuation or spaces cut at MAX_PIECE characters, so training stays linear in the length of unbroken
    lines)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BOUNDED_GPT2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_pieces(texts), trainer=trainer)
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
    if tokenizer.token_to_id(UNKNOWN) is None:
        return []
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    return sorted(c for c in seen if tokenizer.token_to_id(c) is None)  # per distinct character, not per text


def warn_unknown(tokenizer: Tokenizer, texts: Iterable[str], where: str) -> None:
    """Warn, once per character and process, about characters the tokenizer cannot represent."""
    new = [c for c in unknown_chars(tokenizer, texts) if c not in _warned]
    if new:
        _warned.update(new)
        shown = " ".join(repr(c) for c in new[:20]) + (f" and {len(new) - 20} more" if len(new) > 20 else "")
        log.warning("%s: the char tokenizer has no entry for %s; they become <|unk|> and are lost", where, shown)


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The id of lmtrain's <|endoftext|> (models from elsewhere name theirs: see `special_tokens`)."""
    token_id = tokenizer.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")
    return token_id


def document_framing(tokenizer: Tokenizer, end_of_text: int) -> tuple[list[int], list[int]]:
    """(ids before the first document, ids before each later one) of a pretraining stream: the tokenizer's own
    leading special tokens (a BOS where its post-processor puts one in front of a text, as Llama's), the end
    token `end_of_text` between documents, never written twice in a row."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    framed = tokenizer.encode("a", add_special_tokens=True).ids
    at = next((i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain), 0)
    head = framed[:at]
    return head, [end_of_text] + (head[1:] if head[:1] == [end_of_text] else head)


# Files beside tokenizer.json that say how a model's text is framed: read from a Hugging Face folder, carried
# into every checkpoint and export made from it.
SIDE_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


@dataclass
class SpecialTokens:
    """How a model's sequences begin and end, and its generation defaults.

    end_of_text separates documents and ends each task sequence (lmtrain's own tokenizers: <|endoftext|>;
    a Hugging Face model: its tokenizer's eos_token); generation stops at any id in `stop` (Llama 3 has
    several); `generation` holds generation_config.json's sampling defaults."""

    end_of_text: int
    stop: list[int]
    bos: int | None = None  # the model's declared beginning-of-sequence token
    adds_bos: bool = False  # its tokenizer puts `bos` in front of every encoded text (Llama)
    generation: dict = field(default_factory=dict)
    chat_template: str | None = None  # Jinja; None: lmtrain's default (see lmtrain.data.chat)


def _ids(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(f"{where}: a token id must be an integer >= 0, got {value!r}")
    return values


def _token_name(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string or an AddedToken-style {"content": ...}."""
    name = value.get("content") if isinstance(value, dict) else value
    return name if isinstance(name, str) else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# generation_config.json's sampling defaults, checked as the command line's keys are: key -> (check, wanted)
GENERATION_CHECKS: dict[str, tuple[Any, str]] = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _number(v) and 0 <= v < math.inf, "a number >= 0"),
    "top_k": (lambda v: _number(v) and isinstance(v, int) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "max_new_tokens": (lambda v: _number(v) and isinstance(v, int) and v >= 1, "an integer >= 1"),
}
GENERATION_KEYS = tuple(GENERATION_CHECKS)


def generation_defaults(generation: dict, where: str) -> dict:
    """The sampling settings of a generation_config.json, each checked (UserError naming `where` and the key)."""
    chosen = {k: generation[k] for k in GENERATION_KEYS if generation.get(k) is not None}
    for name, value in chosen.items():
        check, wanted = GENERATION_CHECKS[name]
        if not check(value):
            raise UserError(f"{where}: {name} must be {wanted}, got {value!r}")
    return chosen


def _side_json(folder: Path, key: str) -> dict[str, dict]:
    names = (*SIDE_FILES[:2], "config.json")
    return {n: read_folder_json(folder, n, key) for n in names if (folder / n).exists() or (folder / n).is_symlink()}


def special_tokens(tokenizer: Tokenizer, folder: Path, key: str = "ckpt") -> SpecialTokens:
    """The special tokens of the model in `folder` (a checkpoint, export or Hugging Face folder), from its
    generation_config.json, config.json and tokenizer_config.json where present, else lmtrain's own. Every
    file is read inside the folder and size-capped; ids and sampling settings are checked (UserError)."""
    found = _side_json(folder, key)
    generation = found.get("generation_config.json", {})
    model_config = found.get("config.json", {})
    tokenizer_config = found.get("tokenizer_config.json", {})
    in_generation, in_config = f"{key}: '{folder / SIDE_FILES[1]}'", f"{key}: '{folder / 'config.json'}'"
    ids = {
        k: (_ids(generation.get(k), in_generation), _ids(model_config.get(k), in_config))
        for k in ("eos_token_id", "bos_token_id")
    }
    stop = ids["eos_token_id"][0] or ids["eos_token_id"][1]
    name = _token_name(tokenizer_config.get("eos_token"))
    end_of_text = tokenizer.token_to_id(name) if name else None
    if end_of_text is None:
        end_of_text = stop[0] if stop else tokenizer.token_to_id(END_OF_TEXT)
    if end_of_text is None:
        raise UserError(
            f"{key}: the tokenizer in '{folder}' has no end-of-sequence token (set eos_token in tokenizer_config.json)"
        )
    bos_name = _token_name(tokenizer_config.get("bos_token"))
    bos = tokenizer.token_to_id(bos_name) if bos_name else None
    if bos is None:
        bos = next(iter(ids["bos_token_id"][0] or ids["bos_token_id"][1]), None)
    vocab = tokenizer.get_vocab_size()
    for what, token in [("eos_token_id", end_of_text), ("bos_token_id", bos), *(("eos_token_id", i) for i in stop)]:
        if token is not None and token >= vocab:
            raise UserError(f"{key}: '{folder}': {what} {token} is beyond the tokenizer's {vocab} tokens")
    # a BOS counts only where the tokenizer's own post-processor puts it in front of a text (Llama)
    adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos]
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = [t for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)]
        template = {t["name"]: t.get("template") for t in named}.get("default")
    if (folder / SIDE_FILES[2]).exists() or (folder / SIDE_FILES[2]).is_symlink():
        template = read_folder_text(folder, SIDE_FILES[2], key)
    return SpecialTokens(
        end_of_text=end_of_text,
        stop=list(dict.fromkeys([*stop, end_of_text])),
        bos=bos,
        adds_bos=adds_bos,
        chat_template=template if isinstance(template, str) else None,
        generation=generation_defaults(generation, in_generation),
    )


def side_files(folder: Path, key: str = "ckpt") -> dict[str, str]:
    """The SIDE_FILES present in `folder`, by name, to carry into a checkpoint or export (each read inside the
    folder and size-capped)."""
    present = [n for n in SIDE_FILES if (folder / n).exists() or (folder / n).is_symlink()]
    return {name: read_folder_text(folder, name, key) for name in present}
