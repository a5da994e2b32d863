"""Context + question -> answer, generative: loss on the answer; evaluation generates it and scores exact
match and token F1 with SQuAD normalisation."""

from __future__ import annotations

from typing import ClassVar

from lmtrain.config.choices import TaskName
from lmtrain.core.errors import UserError
from lmtrain.tasks import metrics
from lmtrain.tasks.prompted import Generated


class QuestionAnswering(Generated):
    name: ClassVar[str] = TaskName.qa
    main_metric: str = "exact_match"
    higher_is_better: ClassVar[bool] = True
    prompt_roles: ClassVar[tuple[str, ...]] = ("context", "question")
    target_role: ClassVar[str] = "answer"

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"context": (str,), "question": (str,), "answer": (str,)}

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        return metrics.squad_scores(hypotheses, references)

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """The question `prompt` about the passage `context`."""
        if context is None:
            raise UserError("context: a qa checkpoint answers a question (prompt=...) about a passage (context=...)")
        fields = self.info.fields
        return self.prompt_ids({fields["question"]: prompt, fields["context"]: context})
