import numpy as np
import pytest
from conftest import TINY, assert_resume_is_exact, compose

from lmtrain.commands import pretrain
from lmtrain.data import streaming
from lmtrain.data.encoder import Encoder
from lmtrain.data.tokenizer import build_tokenizer
from lmtrain.train.sinks import read_metrics


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A `datasets` folder written by save_to_disk: 400 short documents (one empty, one null)."""
    import datasets

    rng = np.random.default_rng(0)
    words = np.array("the a cat dog sat ran on under mat log big small".split())
    texts = [" ".join(rng.choice(words, rng.integers(5, 30))) + "." for _ in range(400)]
    texts[3], texts[7] = "", None
    folder = tmp_path_factory.mktemp("stream") / "saved"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
    return folder


def test_stream_resumes_at_any_token(saved):
    tokenizer = build_tokenizer("byte", [], 0)
    encoder = Encoder(tokenizer, "data.train")
    whole = streaming.TokenStream(str(saved), "text", encoder, 256).take(5000)
    first = streaming.TokenStream(str(saved), "text", encoder, 256)
    head = first.take(1234)
    rest = streaming.TokenStream(str(saved), "text", encoder, 256, first.position).take(5000 - 1234)
    assert np.array_equal(np.concatenate([head, rest]), whole)
    assert whole[0] != 256 and (whole == 256).sum() > 50  # separators between documents, none in front


def stream_run(run_dir, saved, *extra):
    short = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=2"]
    cfg = compose(*TINY, *short, f"data.train={saved}", "data.streaming=true", "data.tokenizer=byte", *extra)
    return pretrain.run(cfg, str(run_dir))


def test_streaming_run_resumes_bitwise(tmp_path, saved, monkeypatch):
    stream_run(tmp_path / "straight", saved)
    assert [r["step"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert_resume_is_exact(
        lambda run_dir, *extra: stream_run(run_dir, saved, *extra), tmp_path, monkeypatch, 3, "step_0000002"
    )
