"""Chat SFT: conversations (a list of {role, content}) in the model's chat template, with the loss on the
assistant's turns. Scored by loss and perplexity."""

from __future__ import annotations

import contextlib
import logging
from typing import ClassVar

from lmtrain.config import TaskConfig
from lmtrain.config.choices import TaskName
from lmtrain.core.errors import UserError
from lmtrain.data import chat
from lmtrain.data.examples import Example
from lmtrain.data.tokenizer import warn_unknown
from lmtrain.tasks.base import Task, TaskInfo

log = logging.getLogger("lmtrain")


class Chat(Task):
    name: ClassVar[str] = TaskName.chat

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"messages": (list,)}

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        info = super().build_info(cfg, fields, train_records)
        info.decoding = {"overlong": cfg.overlong}  # how over-long conversations were handled travels along
        return info

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        return self.chat_turn_ids(prompt, system)

    def _checked(self, records: list[dict]) -> tuple[list[tuple[int, list[dict]]], list[tuple[int, str]]]:
        """(record number, messages) of the records that hold a conversation to train on, and why each
        other record is skipped."""
        found, problems = [], []
        for number, record in enumerate(records, 1):
            try:
                messages = chat.check_messages(record[self.info.fields["messages"]])
                if not any(m["role"] == "assistant" for m in messages):
                    raise chat.ChatError("no assistant turn to train on")
                found.append((number, messages))
            except chat.ChatError as err:
                problems.append((number, str(err)))
        return found, problems

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        """Conversations with the loss on their assistant turns, tokenized in one batch. One without an
        assistant turn, with a bad role or that the template rejects is skipped and counted; one longer than
        the context is truncated (counted) or, with task overlong=drop, dropped (counted). Raises UserError
        saying why when none is left."""
        found, problems = self._checked(records)
        if found:
            with contextlib.suppress(chat.ChatError):  # a template that refuses it is counted below
                self.check_template(found[0][1], False, "task")
        warn_unknown(self.tokenizer, (m["content"] for _, messages in found for m in messages), key)
        limit, examples, truncated, dropped = self.max_seq_len + 1, [], 0, 0
        drop = self.info.decoding.get("overlong", "truncate") == "drop"
        for (number, _), result in zip(found, self.chats.encode([m for _, m in found]), strict=True):
            if isinstance(result, chat.ChatError):
                problems.append((number, str(result)))
                continue
            ids, mask = result
            if len(ids) > limit and drop:
                dropped += 1
                continue
            truncated += len(ids) > limit
            if any(mask[1:limit]):
                examples.append(Example(ids[:limit], loss_mask=mask[:limit]))
            else:  # truncation cut every assistant token
                dropped += 1
        first = "record {}: {}".format(*min(problems)) if problems else ""
        reasons = [f"skipped {len(problems)} of {len(records)} conversations (first: {first})"] if problems else []
        if dropped:
            reasons.append(f"dropped {dropped} conversations longer than {self.max_seq_len} tokens (task.overlong)")
        for reason in reasons:
            log.warning("%s: %s", key, reason)
        if not examples and reasons:
            raise UserError(f"{key}: no conversation left: {'; '.join(reasons)}")
        return examples, truncated
