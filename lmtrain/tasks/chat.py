"""Chat SFT: conversations (a list of {role, content}) in the model's chat template, with the loss on the
assistant's turns. Scored by loss and perplexity."""

from __future__ import annotations

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

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The tokens generation starts from: `messages` and the template's assistant header."""
        try:
            return chat.tokenize(self.tokenizer, self.chat_template, messages, self.chat_tokens, True)[0]
        except chat.ChatError as err:
            raise UserError(f"ckpt: {err}") from None

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """One user turn (after the `system` message, if any), in the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        warn_unknown(self.tokenizer, [prompt], "prompt")
        return self.chat_ids(messages)

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        """Conversations with the loss on their assistant turns. One without an assistant turn, with a bad
        role or that the template rejects is skipped and counted; one longer than the context is truncated
        (counted) or, with task overlong=drop, dropped (counted)."""
        limit, examples, truncated, dropped, bad, first = self.max_seq_len + 1, [], 0, 0, 0, ""
        for number, record in enumerate(records, 1):
            try:
                messages = chat.check_messages(record[self.info.fields["messages"]])
                if not any(m["role"] == "assistant" for m in messages):
                    raise chat.ChatError("no assistant turn to train on")
                warn_unknown(self.tokenizer, [m["content"] for m in messages], key)
                ids, mask = chat.tokenize(self.tokenizer, self.chat_template, messages, self.chat_tokens)
            except chat.ChatError as err:
                bad, first = bad + 1, first or f"record {number}: {err}"
                continue
            if len(ids) > limit:
                if self.info.decoding.get("overlong", "truncate") == "drop":
                    dropped += 1
                    continue
                truncated += 1
                ids, mask = ids[:limit], mask[:limit]
            if any(mask[1:]):
                examples.append(Example(ids, loss_mask=mask))
            else:  # truncation cut every assistant token
                dropped += 1
        if bad:
            log.warning("%s: skipped %d of %d conversations (first: %s)", key, bad, len(records), first)
        if dropped:
            log.warning("%s: dropped %d conversations longer than %d tokens", key, dropped, self.max_seq_len)
        return examples, truncated
