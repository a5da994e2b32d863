"""A task defined outside lmtrain (here: reverse a text) registers itself and then finetunes, validates,
evaluates and resumes through the real `lmtrain finetune` / `lmtrain evaluate` code, with no lmtrain module
edited: one class and one `register` call."""

import json
import random
from typing import ClassVar

import pytest
from conftest import WORDS, assert_resume_is_exact, write_jsonl

from lmtrain.cli import check
from lmtrain.commands import evaluate, finetune
from lmtrain.config import EvaluateConfig, FinetuneConfig
from lmtrain.config.checks import ConfigError
from lmtrain.data.examples import Example
from lmtrain.tasks import registry
from lmtrain.tasks.prompted import Generated


class Reverse(Generated):
    """text -> the text backwards: prompt text EOT, target reversed-text EOT; scored by exact match."""

    name: ClassVar[str] = "reverse"
    main_metric: ClassVar[str] = "exact_match"
    higher_is_better: ClassVar[bool] = True
    prompt_roles: ClassVar[tuple[str, ...]] = ("text",)

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        examples = []
        for record in records:
            prompt, backwards = self.prompt_ids(record), record[self.info.fields["text"]][::-1]
            target = self._encode([backwards], key)[0] + [self.eot]
            examples.append(Example(prompt + target, loss_start=len(prompt), reference=backwards))
        return examples, 0

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        hits = sum(h == r for h, r in zip(hypotheses, references, strict=True))
        return {"exact_match": 100.0 * hits / len(references)}


@pytest.fixture
def reverse(monkeypatch):
    """Reverse registered for this test only (the registry and Hydra's store are restored afterwards)."""
    from hydra.core.config_store import ConfigStore

    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))
    monkeypatch.setitem(ConfigStore.instance().repo, "task", {})
    registry.register(Reverse, {"max_new_tokens": 8, "max_eval_examples": 8})


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    rng = random.Random(0)
    records = [{"text": " ".join(rng.sample(WORDS[:6], 2))} for _ in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("reverse") / "train.jsonl", records)


def test_an_unregistered_task_is_no_option():
    with pytest.raises(ConfigError, match="task=reverse: no such option"):
        check("finetune", FinetuneConfig, ["init_from=x", "data.train=x.jsonl", "task=reverse"])


def test_a_registered_task_finetunes_evaluates_and_resumes(reverse, tiny_runs, words, tmp_path, monkeypatch):
    overrides = [f"init_from={tiny_runs['lm']}", f"data.train={words}", "task=reverse", "epochs=null"]
    overrides += ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.checkpoint_every=3", "optimizer.lr=3e-3"]
    overrides += ["scheduler.warmup_steps=2", "trainer.micro_batch_size=8", "trainer.device=cpu"]
    overrides += ["trainer.progress_bar=false", "trainer.log_every=1"]

    def run(run_dir, *extra):
        return finetune.run(check("finetune", FinetuneConfig, [*overrides, *extra]), str(run_dir))

    summary = run(tmp_path / "straight")
    assert "best_val_exact_match" in summary and summary["objective"] == -summary["best_val_exact_match"]
    best = tmp_path / "straight" / "checkpoints" / "best"
    info = json.loads((best / "task.json").read_text())
    assert info["name"] == "reverse" and info["fields"] == {"text": "text"}
    assert info["decoding"]["max_new_tokens"] == 8
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.3  # it learns the task

    # lmtrain evaluate finds the task by the name in task.json and scores the held-out split again
    evaluate.run(check("evaluate", EvaluateConfig, [f"ckpt={best}", "split=validation"]), str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == "reverse" and report["num_examples"] == 6  # 10% of 64 held out, as finetune did
    assert 0.0 <= report["exact_match"] <= 100.0 and report["loss"] > 0

    assert_resume_is_exact(run, tmp_path, monkeypatch, 4, "step_0000003")
