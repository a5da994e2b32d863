"""Checkpoints an older lmtrain wrote (tests/fixtures/old_checkpoints.py rebuilds them from the history) still
load, generate, predict and resume as they did then: the on-disk format is a promise to every run already on
disk."""

import json
from pathlib import Path

import pytest
from conftest import lmtrain_many, write_jsonl
from fixtures import old_checkpoints
from fixtures.make_checkpoints import PROMPT, TEXTS, finetune_overrides, loaded, pretrain_overrides

from lmtrain.train.sinks import read_metrics


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """The old checkpoints and what they gave then, written by the old code into a scratch folder."""
    return old_checkpoints.write(tmp_path_factory.mktemp("old"))


@pytest.fixture(scope="module")
def expected(old) -> dict:
    return json.loads((old / "expected.json").read_text())


def close(now, then) -> bool:
    """Equal, numbers to float32 rounding, through nested lists and dicts."""
    if isinstance(then, dict):
        return isinstance(now, dict) and now.keys() == then.keys() and all(close(now[k], then[k]) for k in then)
    if isinstance(then, list):
        return isinstance(now, list) and len(now) == len(then) and all(map(close, now, then))
    if isinstance(then, float):
        return now == pytest.approx(then, rel=1e-5, abs=1e-6)
    return now == then


@pytest.mark.parametrize("name", ["pretrain", "classifier"])
def test_an_old_checkpoint_loads_to_the_same_outputs(old, expected, name):
    now = loaded(old / name)
    for key, values in now.items():
        assert close(values, expected[name][key]), key


def test_an_old_checkpoint_generates_predicts_and_resumes_as_it_did(old, expected, tmp_path):
    texts = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    pretrain, classifier = old / "pretrain", old / "classifier"
    resume_lm = ["pretrain", *pretrain_overrides(old / "corpus.txt"), "trainer.max_steps=5"]
    resume_lm += [f"trainer.resume={pretrain}", f"hydra.run.dir={tmp_path / 'lm'}"]
    resume_classifier = ["finetune", *finetune_overrides(pretrain, old / "classification.jsonl")]
    resume_classifier += ["trainer.max_steps=4", f"trainer.resume={classifier}", f"hydra.run.dir={tmp_path / 'cls'}"]
    generated, predicted, *resumed = lmtrain_many(
        [
            ["generate", f"ckpt={pretrain}", f"prompt={PROMPT}", "temperature=0", "max_new_tokens=8", "device=cpu"],
            ["predict", f"ckpt={classifier}", f"input={texts}", "device=cpu"],
            resume_lm,
            resume_classifier,
        ],
        cwd=tmp_path,
    )
    for result in (generated, predicted, *resumed):
        assert result["rc"] == 0, result["stderr"]
    assert generated["stdout"] == expected["pretrain"]["generate"]
    predictions = [json.loads(line) for line in predicted["stdout"].splitlines()]
    assert close(predictions, expected["classifier"]["predict"])
    for run, name in (("lm", "pretrain"), ("cls", "classifier")):
        records = read_metrics(tmp_path / run / "metrics.jsonl")
        records = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records]
        assert len(records) > 2 and close(records, expected[name]["resumed"]), run
