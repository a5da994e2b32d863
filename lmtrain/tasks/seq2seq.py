"""Source -> target (translation, summarization): loss on the target; evaluation generates after the
source and scores BLEU and chrF."""

from __future__ import annotations

from typing import ClassVar

from lmtrain.config.choices import TaskName
from lmtrain.tasks import metrics
from lmtrain.tasks.prompted import Generated


class Seq2Seq(Generated):
    name: ClassVar[str] = TaskName.seq2seq
    main_metric: ClassVar[str] = "bleu"
    higher_is_better: ClassVar[bool] = True
    prompt_roles: ClassVar[tuple[str, ...]] = ("source",)
    target_role: ClassVar[str] = "target"

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"source": (str,), "target": (str,)}

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return metrics.bleu_chrf(hypotheses, references)
