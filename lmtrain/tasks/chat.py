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
from lmtrain.data.tokenizer import unknown_chars, warn_unknown
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

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The tokens generation starts from: `messages` and the template's assistant header. Raises
        ChatError with the template's own message where it refuses the conversation."""
        result = self.chats.encode([messages], add_generation_prompt=True)[0]
        if isinstance(result, chat.ChatError):
            raise result
        return result[0]

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """One user turn (after the `system` message, if any), in the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        warn_unknown(self.tokenizer, [prompt, *([system] if system else [])], "prompt")
        try:
            self.check_template(messages, True, "chat")
            return self.chat_ids(messages)
        except chat.ChatError as err:
            raise UserError(f"chat: {err}") from None

    def check_template(self, messages: list[dict], add_generation_prompt: bool, key: str) -> None:
        """UserError where the tokenizer cannot encode the template's own text (a char-level tokenizer without
        the characters of its role headers): the model would read <|unk|> where each turn begins."""
        missing = unknown_chars(self.tokenizer, [self.chats.template_text(messages, add_generation_prompt)])
        if missing:
            shown = " ".join(repr(c) for c in missing[:20])
            raise UserError(
                f"{key}: the model's tokenizer cannot encode the chat template's text (no entry for {shown})"
            )

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
