"""A benchmark suite inside training (trainer.eval_suite): a callable the run's validation adds to its metrics at
the suite's own cadence. Its keys, `suite_<task>_<metric>`, `suite_mean` and `suite_core`, reach metrics.jsonl as
`val_suite_...`; trainer.eval_suite_metric may name one as the main metric for the best checkpoint and early
stopping."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from lmtrain.config.schema import TrainerConfig
from lmtrain.data.tokenizer import SpecialTokens
from lmtrain.evals.scorer import Scorer
from lmtrain.evals.suite import load_suite, report, score_suite
from lmtrain.model.transformer import TransformerLM


def suite_metrics(scores: dict[str, dict]) -> dict[str, float]:
    """eval.json's scores as flat validation metrics: suite_<task>_<metric>, suite_mean, suite_core."""
    flat = {}
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if metric != "n":
                flat[f"suite_{metric}" if task == "suite" else f"suite_{task}_{metric}"] = float(value)
    return flat


def suite_evaluation(
    settings: TrainerConfig,
    model: TransformerLM,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    device: torch.device,
    step: Callable[[], int],
    max_steps: int,
) -> Callable[[], dict[str, float]]:
    """A callable giving the suite's metrics at validations whose step is a multiple of trainer.eval_suite_every
    (null: every validation) or the last (`max_steps`), and {} at the others. The suite file is read now, so a bad one
    fails before training. Scores depend on the weights only (the few-shot draw is reseeded each time), so a
    resumed run scores as the uninterrupted one."""
    if settings.eval_suite is None:
        return dict
    _, specs = load_suite(settings.eval_suite, "trainer.eval_suite")
    scorer = Scorer(model, tokenizer, special, device, settings.precision)

    def evaluate() -> dict[str, float]:
        every = settings.eval_suite_every
        if every is not None and step() % every != 0 and step() != max_steps:
            return {}
        was_training = model.training
        try:
            results = score_suite(specs, scorer, settings.eval_suite_limit, settings.eval_suite_num_fewshot)
        finally:
            model.train(was_training)
        return suite_metrics(report(results))

    return evaluate


def main_metric_args(settings: TrainerConfig, metric: str, higher_is_better: bool, keep_best: bool) -> dict:
    """`runs.train`'s main-metric arguments: trainer.eval_suite_metric, when set, replaces the run's own metric
    (higher is better; the best checkpoint is kept)."""
    if settings.eval_suite_metric is None:
        return {"main_metric": metric, "higher_is_better": higher_is_better, "keep_best": keep_best}
    return {"main_metric": settings.eval_suite_metric, "higher_is_better": True, "keep_best": True}
