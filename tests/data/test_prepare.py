import time

import numpy as np
import pytest
from conftest import prepare_tokens

from lmtrain.data import corpus, tokens
from lmtrain.data.encoder import Encoder
from lmtrain.data.shards import ShardWriter, TokenView
from lmtrain.data.tokenizer import build_tokenizer, end_of_text_id

TRICKY = "déjà vu — naïve\r\n café\t<|endoftext|> ✓ 𝄞 \x00 end\n"


def prepare(tmp_path, train, cache="cache", **kw):
    return prepare_tokens(tmp_path / cache, train, **kw)


@pytest.fixture
def books(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(f"book {i}: " + "the cat sat on the mat.\n" * (20 + 7 * i))
    return folder


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_vectorised_encoding_equals_the_library(kind):
    tokenizer = build_tokenizer(kind, [TRICKY[:30]], 300)  # char: some characters unknown
    encoder = Encoder(tokenizer, "data.train")
    assert encoder.encode != encoder._library
    texts = [TRICKY, TRICKY[::-1], "a"]
    expected = [np.array(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    for ours, theirs in zip(encoder.encode(texts), expected, strict=True):
        assert ours.dtype == np.uint16 and np.array_equal(ours, theirs)


def test_text_pieces_are_cut_as_the_whole_document_would_be(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 10)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 25)
    text = "short\nline\r\n" + "a" * 40 + "\nlast line without end"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    read = list(corpus.read_text_pieces(path, "data.train"))
    assert read == list(corpus.pieces(text.replace("\r\n", "\n")))
    assert "".join(read) == text.replace("\r\n", "\n") and max(map(len, read)) == 25


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_sharded_tokens_equal_one_shard_bitwise(tmp_path, books, kind):
    one = prepare(tmp_path, books, "one", tokenizer=kind)
    many = prepare(tmp_path, books, "many", tokenizer=kind, shard_tokens=64)
    assert isinstance(many.train, TokenView) and not isinstance(one.train, TokenView)
    assert np.array_equal(np.asarray(one.train), np.asarray(many.train))
    assert np.array_equal(np.asarray(one.validation), np.asarray(many.validation))
    assert np.array_equal(one.train_documents, many.train_documents) and len(one.train_documents) == 4
    separator = end_of_text_id(one.tokenizer)
    assert one.train_documents[0] == 0 and all(one.train[int(p)] == separator for p in one.train_documents[1:])
    a, b = tokens.WindowSampler(one.train, 16, seed=3), tokens.WindowSampler(many.train, 16, seed=3)
    for x, y in zip(a.next_step(2, 8), b.next_step(2, 8), strict=True):
        assert all(np.array_equal(u, v) for u, v in zip(x, y, strict=True))


def test_token_view_slices_and_gathers():
    flat = np.arange(250, dtype=np.uint16)
    view = TokenView([flat[i : i + 100] for i in range(0, 250, 100)], 100)[30:240]
    assert len(view) == 210 and np.array_equal(np.asarray(view), flat[30:240])
    index = np.array([[0, 69, 70, 209], [150, 151, 5, 100]])
    assert np.array_equal(view[index], flat[30:240][index]) and view[-1] == 239


def test_killed_preparation_restarts_from_its_finished_shards(tmp_path, books, monkeypatch):
    clean = prepare(tmp_path, books, "clean", tokenizer="bpe", shard_tokens=50)
    close = ShardWriter._close_shard
    calls = []

    def dies_at_the_third_shard(self, item, offset):
        calls.append(1)
        if len(calls) == 3:  # mid-shard: its bytes are written, it is not closed
            raise KeyboardInterrupt
        close(self, item, offset)

    monkeypatch.setattr(ShardWriter, "_close_shard", dies_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, books, "killed", tokenizer="bpe", shard_tokens=50)
    (partial,) = (tmp_path / "killed").glob(".*.partial")
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("train_*.bin")}
    assert sorted(kept) == ["train_00000.bin", "train_00001.bin"] and list(partial.glob("*.bin.partial"))
    monkeypatch.setattr(ShardWriter, "_close_shard", close)
    monkeypatch.setattr(tokens, "build_tokenizer", lambda *a: pytest.fail("trained the tokenizer again"))
    resumed = prepare(tmp_path, books, "killed", tokenizer="bpe", shard_tokens=50)
    assert {n: (resumed.cache_path / n).stat().st_mtime_ns for n in kept} == kept
    assert np.array_equal(np.asarray(clean.train), np.asarray(resumed.train))
    assert np.array_equal(np.asarray(clean.validation), np.asarray(resumed.validation))
    assert np.array_equal(clean.train_documents, resumed.train_documents)
    assert not list(resumed.cache_path.glob("*.progress.json"))


def test_one_line_of_5_mb_without_spaces_prepares_in_seconds(tmp_path):
    words = np.array(["var", "x=", "1;", "function(", ")", "{", "}", "return", "a.b", "0x1f", "if(", "==", "null"])
    line = tmp_path / "minified.txt"
    text = "".join(np.random.default_rng(0).choice(words, 1_600_000))[:5_000_000]
    line.write_text(text)
    started = time.perf_counter()
    data = prepare(tmp_path, line, tokenizer="bpe", vocab_size=300)
    assert time.perf_counter() - started < 60  # ~5 s on 2 cores; quadratic BPE training took minutes
    assert line.read_text().startswith(data.tokenizer.decode(np.asarray(data.train[:100]).tolist()))
    assert len(data.train) + len(data.validation) > 500_000


def test_lmtrain_prepare_composes_the_config_once_and_never_imports_torch(tmp_path):
    import subprocess
    import sys

    (tmp_path / "corpus.txt").write_text("hello world, hello tokens\n" * 200)
    script = f"""
import sys
import hydra
from hydra._internal import hydra as hydra_internal
calls = []
compose = hydra_internal.Hydra.compose_config
hydra_internal.Hydra.compose_config = lambda *a, **k: calls.append(1) or compose(*a, **k)
from lmtrain.cli import main
rc = main(["prepare", "data.tokenizer=byte", "data.train={tmp_path / "corpus.txt"}", "data.cache_dir={tmp_path}/c"])
print(rc, len(calls), "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.split()[-3:] == ["0", "1", "False"], result.stderr
    assert "prepared train" in result.stdout and any((tmp_path / "c").iterdir())
