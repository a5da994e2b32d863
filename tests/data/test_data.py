import json

import numpy as np
import pytest
import torch
from conftest import prepare_tokens

from lmtrain.core.errors import UserError
from lmtrain.data import tokens
from lmtrain.data.corpus import stdlib_files
from lmtrain.data.tokenizer import build_tokenizer

TEXT = "déjà vu — naïve café\n\tdef f(x):\n    return x  # ✓\n"


def prepare(tmp_path, train, **kw):
    return prepare_tokens(tmp_path / "cache", train, **kw)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizers_round_trip(kind):
    tokenizer = build_tokenizer(kind, [TEXT * 20], 300)
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == TEXT
    if kind == "byte":
        assert ids == list(TEXT.encode())


def test_text_file_packs_exactly_and_holds_out_the_tail(tmp_path, corpus):
    data = prepare(tmp_path, train=str(corpus))
    text = corpus.read_text()
    total = len(data.train) + len(data.validation)
    assert total == len(text) and len(data.validation) == int(len(text) * 0.1)
    assert data.tokenizer.decode(np.asarray(data.train[:50]).tolist()) == text[:50]
    assert data.tokenizer.decode(np.asarray(data.validation).tolist()) == text[len(data.train) :]


def test_second_prepare_uses_the_cache(tmp_path, corpus, monkeypatch):
    first = prepare(tmp_path, train=str(corpus))
    monkeypatch.setattr(tokens, "_build", lambda *a, **k: pytest.fail("rebuilt a cached corpus"))
    second = prepare(tmp_path, train=str(corpus))
    assert second.cache_path == first.cache_path
    assert np.array_equal(first.train, second.train)


def test_cache_key_follows_content_and_tokenizer(tmp_path, corpus):
    a = prepare(tmp_path, train=str(corpus))
    b = prepare(tmp_path, train=str(corpus), tokenizer="byte")
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text() + "x")
    c = prepare(tmp_path, train=str(other))
    assert len({a.cache_path, b.cache_path, c.cache_path}) == 3


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_structured_files_and_validation_file(tmp_path, suffix):
    import datasets

    rows = {"body": [f"record {i}: the cat sat on the mat." for i in range(200)]}
    train, val = tmp_path / f"train.{suffix}", tmp_path / f"val.{suffix}"
    for path, n in ((train, 150), (val, 200)):
        ds = datasets.Dataset.from_dict({"body": rows["body"][:n] if path == train else rows["body"][150:]})
        getattr(ds, {"jsonl": "to_json", "csv": "to_csv", "parquet": "to_parquet"}[suffix])(str(path))
    data = prepare(tmp_path, train=str(train), validation=str(val), text_field="body")
    decoded = data.tokenizer.decode(np.asarray(data.validation).tolist())
    assert decoded.startswith("record 150:") and "record 199:" in decoded
    with pytest.raises(UserError, match="data.text_field: .* has no field 'text'; its fields are body"):
        prepare(tmp_path, train=str(train), text_field="text")


def test_folder_of_text_files(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("aaaa\n" * 100)
    (folder / "b.txt").write_text("bbbb\n" * 100)
    data = prepare(tmp_path, train=str(folder), val_fraction=0.5)
    assert len(data.train) + len(data.validation) == 1001  # two documents and a separator


@pytest.mark.parametrize("path", ["missing.txt", "./nope/corpus"])
def test_missing_path_is_a_user_error(tmp_path, path):
    with pytest.raises(UserError, match="data.train: no such file or folder"):
        prepare(tmp_path, train=str(tmp_path / path))


def test_embedded_corpus_is_the_standard_library():
    files = stdlib_files()
    assert len(files) > 100 and any(p.name == "functools.py" for p in files)
    assert not any("test" in p.parts for p in files)


def test_sampler_is_seeded_resumable_and_split_invariant():
    data = np.arange(1000, dtype=np.uint16)
    a = tokens.WindowSampler(data, 8, seed=1)
    state = a.state_dict()
    whole = a.next_step(1, 16)
    b = tokens.WindowSampler(data, 8, seed=99)
    b.load_state_dict(state)
    parts = b.next_step(4, 4)
    assert torch.equal(torch.cat([x for x, _ in parts]), whole[0][0])
    x, y = whole[0]
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64


def test_validation_windows_are_fixed_and_cover_the_split():
    data = np.arange(500, dtype=np.uint16)
    batches = tokens.validation_batches(data, 10, 2, 3)
    assert len(batches) == 2 and batches[0][0].shape == (3, 10)
    assert batches[0][0][0, 0] == 0 and batches[-1][1][-1, -1] == 499


def test_corpus_too_short_for_context(tmp_path):
    with pytest.raises(UserError, match="model.max_seq_len=64"):
        tokens.WindowSampler(np.arange(10, dtype=np.uint16), 64, seed=0)


def test_manifest_records_spans(tmp_path, corpus):
    data = prepare(tmp_path, train=str(corpus))
    meta = json.loads((data.cache_path / "manifest.json").read_text())
    assert meta["spans"]["train"][2] == meta["spans"]["validation"][1] == len(data.train)
