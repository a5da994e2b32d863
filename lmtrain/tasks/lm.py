"""Language modelling: continued pretraining on plain text, or instruction tuning on prompt/response records
with the loss on the response. Scored by loss and perplexity."""

from __future__ import annotations

from typing import ClassVar

from lmtrain.config.choices import TaskName
from lmtrain.data.examples import Example
from lmtrain.tasks.prompted import Prompted


class LanguageModelling(Prompted):
    name: ClassVar[str] = TaskName.lm
    text_unit: ClassVar[str] = "document"
    prompt_roles: ClassVar[tuple[str, ...]] = ("prompt",)
    target_role: ClassVar[str] = "response"

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"prompt": (str,), "response": (str,)} if instruction else {"text": (str,)}

    @classmethod
    def is_instruction(cls, fields: dict[str, str], record: dict) -> bool:
        """Records holding data.prompt_field are prompt/response records."""
        return fields["prompt"] in record

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        if self.info.instruction:
            return super()._examples(records, key)
        limit, examples = self.max_seq_len + 1, []
        for ids in self._encode(self._column(records, "text"), key):
            if not ids:  # an empty text has nothing to predict
                continue
            ids = self.start + ids + [self.eot]  # windows overlap by one token so each token is predicted once
            examples += [Example(ids[i : i + limit]) for i in range(0, max(len(ids) - 1, 1), limit - 1)]
        return examples, 0

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """An instruction-tuned model's prompt as it trained; plain text is framed by the tokenizer."""
        return super().user_prompt_ids(prompt, context, system) if self.info.instruction else None
