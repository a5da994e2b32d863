import numpy as np
import pytest
import torch
from conftest import TINY, assert_resume_is_exact, compose, make_corpus

from lmtrain.commands import pretrain
from lmtrain.data import tokens
from lmtrain.data.mixture import MixtureSampler
from lmtrain.train.sinks import read_metrics


def samplers(seed=0):
    parts = [tokens.WindowSampler(np.full(500, n, dtype=np.uint16), 8, seed) for n in range(3)]
    return MixtureSampler(parts, ["a", "b", "c"], [0.6, 0.3, 0.1], seed)


def test_mixture_draws_its_weights_deterministically_and_resumes():
    sampler = samplers()
    drawn = torch.cat([x for _ in range(300) for x, _ in sampler.next_step(2, 8)])[:, 0]
    shares = torch.bincount(drawn.long(), minlength=3).double() / len(drawn)
    assert torch.allclose(shares, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.02)
    record = sampler.accounting()
    assert sum(record[f"tokens_{n}"] for n in "abc") == len(drawn) * 8
    assert record["epochs_a"] == pytest.approx(record["tokens_a"] / 500)

    first, second = samplers(), samplers()
    first.next_step(1, 4)
    second.load_state_dict(first.state_dict())
    for (x, _), (y, _) in zip(first.next_step(2, 4, 1, 2), second.next_step(2, 4, 1, 2), strict=True):
        assert torch.equal(x, y)
    assert first.accounting() == second.accounting()


def test_ranks_together_draw_what_one_process_draws():
    whole = samplers(5).next_step(1, 8)[0][0]
    ranks = [samplers(5).next_step(1, 4, rank, 2)[0][0] for rank in range(2)]
    assert torch.equal(torch.cat(ranks), whole)


def test_bos_aligned_windows_start_at_document_starts():
    stream = np.arange(1000, dtype=np.uint16)
    starts = np.array([0, 100, 400, 990])  # 990: too close to the end for a window of 17
    sampler = tokens.WindowSampler(stream, 16, seed=0, starts=starts)
    first = torch.cat([x for x, _ in sampler.next_step(4, 8)])[:, 0]
    assert set(first.tolist()) == {0, 100, 400}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for name, seed in (("web", 1), ("code", 2)):
        (root / name).mkdir()
        for number in range(6):
            make_corpus(root / name / f"{number}.txt", sentences=60, seed=seed * 100 + number)
    return root


def mixture_run(run_dir, sources, *extra):
    spec = f"data.sources=[{{path: {sources / 'web'}, weight: 0.7}}, {{path: {sources / 'code'}, weight: 0.3}}]"
    short = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=2"]
    cfg = compose("data=mixture", *TINY, *short, spec, "data.window=bos_aligned", "data.document_masking=true", *extra)
    return pretrain.run(cfg, str(run_dir))


def test_mixture_run_reports_each_source_and_resumes_bitwise(tmp_path, sources, monkeypatch):
    summary = mixture_run(tmp_path / "straight", sources)
    records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    validation = [r for r in records if "val_loss" in r]
    assert {"val_web_loss", "val_code_loss"} <= set(validation[0])
    train = [r for r in records if "loss" in r]
    assert train[-1]["tokens_web"] + train[-1]["tokens_code"] == train[-1]["tokens_seen"]
    assert summary["mfu"] is not None

    assert_resume_is_exact(
        lambda run_dir, *extra: mixture_run(run_dir, sources, *extra), tmp_path, monkeypatch, 3, "step_0000002"
    )


def test_a_mistyped_source_key_is_one_line():
    from lmtrain.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose("data=mixture", "data.sources=[{path: a/, weigh: 0.7}]")
    assert str(err.value) == "data.sources: a source has no key 'weigh'; it takes path, weight and name"
