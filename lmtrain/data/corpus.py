"""Reading text corpora with `datasets`: local files and folders, `datasets` names, the embedded default."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmtrain.core.errors import UserError

EMBEDDED = "python-stdlib"
PIECE_CHARS = 1 << 20  # a long document is encoded in pieces cut at the first line end after this many characters
MAX_PIECE_CHARS = 1 << 26  # ... or after this many, in a line that long (a text never becomes one huge string)
TEXT_SUFFIXES = (".txt", ".md")
# file suffix -> `datasets` packaged builder
BUILDERS = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
}


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (minus its test suites): a corpus every Python install has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _STDLIB_SKIP and not d.startswith("config-"))
        files.extend(Path(folder) / n for n in sorted(names) if n.endswith(".py"))
    return files


def resolve_files(source: str, key: str) -> list[Path] | None:
    """Local files behind `source`, or None when it is a `datasets` name. Raises UserError for a bad path."""
    if source == EMBEDDED:
        return stdlib_files()
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file())
        if not files:
            raise UserError(f"{key}: folder '{source}' holds no {'/'.join(sorted(BUILDERS))} files")
        if len({BUILDERS[p.suffix] for p in files}) > 1:
            raise UserError(f"{key}: folder '{source}' mixes file formats; keep one format per folder")
        return files
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise UserError(f"{key}: '{source}' is not a {'/'.join(sorted(BUILDERS))} file")
        return [path]
    if (
        path.suffix in BUILDERS
        or source.startswith((".", "/", "~"))
        or path.parent.is_dir()
        and path.parent != Path(".")
    ):
        raise UserError(f"{key}: no such file or folder '{source}'")
    return None  # a `datasets` name such as "user/corpus"


def fingerprint(source: str, files: list[Path] | None) -> str:
    """A hash of the corpus content (or of a `datasets` name, which names fixed content)."""
    digest = hashlib.sha256()
    if files is None:
        digest.update(source.encode())
    for path in files or []:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def first_broken_line(files: list[Path]) -> str | None:
    """ "'<file>' line N: <why>" for the first line of the .jsonl `files` that is not a JSON object (datasets'
    own error names neither), or None."""
    for path in files:
        if path.suffix != ".jsonl":
            continue
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as err:
                    return f"'{path}' line {number}: not JSON ({str(err).splitlines()[0]})"
                if not isinstance(value, dict):
                    return f"'{path}' line {number}: not a JSON object"
    return None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs its own error lines before raising; lmtrain reports the failure in one line of its own."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def unreadable(err: Exception, key: str, source: str, files: list[Path] | None) -> UserError:
    """The one-line error for a data source `datasets` cannot read: the broken line where there is one."""
    broken = first_broken_line(files) if files else None
    if broken:
        return UserError(f"{key}: {broken}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{key}: cannot read '{source}': {first}")


def iter_documents(
    source: str,
    files: list[Path] | None,
    text_field: str,
    key: str,
    on_bad_record: str = "skip",
    skipped: dict[str, int] | None = None,
) -> Iterator[str]:
    """Yield documents (strings) in a fixed order. A .txt file is one document, newlines kept.

    A record whose text is missing, null or not a string is skipped (and counted in `skipped[key]`), or with
    on_bad_record="error" is a UserError naming its line."""
    if source == EMBEDDED:
        assert files is not None, "resolve_files lists the embedded corpus"
        for path in files:
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    import datasets

    datasets.disable_progress_bars()
    try:
        if files is None:  # a `datasets` name: data.validation reads its validation split
            dataset = datasets.load_dataset(source, split="validation" if key == "data.validation" else "train")
        else:
            builder = BUILDERS[files[0].suffix]
            options = {"sample_by": "document"} if builder == "text" else {}
            with quiet_datasets():
                dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except Exception as err:  # datasets raises many types for unreadable input
        raise unreadable(err, key, source, files) from err
    field = "text" if files is not None and BUILDERS[files[0].suffix] == "text" else text_field
    if field not in dataset.column_names:
        raise UserError(
            f"data.text_field: '{source}' has no field '{field}'; its fields are {', '.join(dataset.column_names)}"
        )
    number = 0
    for batch in dataset.iter(batch_size=1000):
        for text in batch[field]:
            number += 1
            if not isinstance(text, str):
                what = "null or missing" if text is None else f"{type(text).__name__}, not text"
                if on_bad_record == "error":
                    raise UserError(f"{key}: '{source}' line {number}: field '{field}' is {what}")
                if skipped is not None:
                    skipped[key] = skipped.get(key, 0) + 1
                continue
            if text:
                yield text


def pieces(document: str) -> Iterator[str]:
    """`document` cut into pieces of PIECE_CHARS characters extended to the next line end (at most
    MAX_PIECE_CHARS): the cut points of reading the document as a stream (`read_text_pieces`)."""
    start = 0
    while start < len(document):
        end = start + PIECE_CHARS
        if end < len(document):
            newline = document.find("\n", end, start + MAX_PIECE_CHARS)
            end = start + MAX_PIECE_CHARS if newline < 0 else newline + 1
        yield document[start:end]
        start = end


def read_text_pieces(path: Path, key: str) -> Iterator[str]:
    """The pieces of a text file, read in bounded chunks (newlines translated as `open` does): the same pieces
    as `pieces(path.read_text())`, without ever holding the whole file."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(PIECE_CHARS):
                yield chunk + f.readline(MAX_PIECE_CHARS - PIECE_CHARS)
    except UnicodeDecodeError as err:
        raise UserError(f"{key}: cannot read '{path}': not UTF-8 ({err.reason} at byte {err.start})") from None


def iter_pieces(
    source: str,
    files: list[Path] | None,
    text_field: str,
    key: str,
    on_bad_record: str = "skip",
    skipped: dict[str, int] | None = None,
) -> Iterator[tuple[bool, str]]:
    """(starts_a_document, text) for every piece of every document of the corpus, in a fixed order. A .txt or
    .md file is one document, read as a stream; records of other formats come from `iter_documents`."""
    if files is not None and source != EMBEDDED and files[0].suffix in TEXT_SUFFIXES:
        for path in files:
            for number, piece in enumerate(read_text_pieces(path, key)):
                yield number == 0, piece
        return
    for document in iter_documents(source, files, text_field, key, on_bad_record, skipped):
        for number, piece in enumerate(pieces(document)):
            yield number == 0, piece
