"""Source -> target (translation, summarization): loss on the target; evaluation generates after the
source and scores BLEU and chrF (translation) and ROUGE-1/2/L (summarization); `task.metric` picks the one
that chooses checkpoints/best and early stopping."""

from __future__ import annotations

from typing import ClassVar

from lmtrain.config import TaskConfig
from lmtrain.config.choices import TaskName
from lmtrain.tasks import metrics
from lmtrain.tasks.base import TaskInfo
from lmtrain.tasks.prompted import Generated


class Seq2Seq(Generated):
    name: ClassVar[str] = TaskName.seq2seq
    main_metric: str = "bleu"
    higher_is_better: ClassVar[bool] = True
    prompt_roles: ClassVar[tuple[str, ...]] = ("source",)
    target_role: ClassVar[str] = "target"

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"source": (str,), "target": (str,)}

    def __init__(self, info: TaskInfo, *args, **kwargs):
        super().__init__(info, *args, **kwargs)
        self.main_metric = info.decoding.get("metric", "bleu")  # checkpoints from before task.metric: BLEU

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        info = super().build_info(cfg, fields, train_records)
        info.decoding["metric"] = str(cfg.metric)
        return info

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return {**metrics.bleu_chrf(hypotheses, references), **metrics.rouge(hypotheses, references)}
