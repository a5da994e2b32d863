"""Preference tuning (DPO and its relatives, lmtrain.train.preference): pairs of a chosen and a rejected answer
to the same prompt, in the formats TRL documents:

  standard        {prompt, chosen, rejected} strings: prompt EOT answer EOT, the loss on the answer and its EOT
  conversational  prompt a list of messages, chosen/rejected lists holding the assistant turn: rendered with the
                  model's chat template, the loss on the answer's assistant tokens (lmtrain.data.chat's mask)
  implicit prompt no prompt field; chosen and rejected full texts or conversations sharing a prefix, which is
                  the prompt (whole messages; for text, up to the last whitespace before they differ)

A record with an empty answer, identical answers, a prompt of max_seq_len tokens or more, or messages the
template rejects is skipped and counted. An over-long pair gives up the start of its prompt until the longer
answer fits, keeping at least half the context for the prompt; then the answers are cut at their end (counted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lmtrain.config import FinetuneConfig, TaskConfig
from lmtrain.config.choices import AdapterName, PreferenceLoss, Reference, TaskName
from lmtrain.core.distributed import Placement
from lmtrain.core.errors import UserError
from lmtrain.data import chat
from lmtrain.data.examples import Example, fixed_batches
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks.base import IGNORE, Task, TaskInfo
from lmtrain.tasks.preference_reference import build_objective, score_pairs
from lmtrain.train.objective import Objective
from lmtrain.train.preference import REFERENCE_FREE

log = logging.getLogger("lmtrain")
SKIPS = {
    "empty_answer": "empty answer",
    "identical_answers": "identical chosen and rejected",
    "prompt_too_long": "prompt longer than the context",
    "bad_messages": "messages the chat template rejects",
}


@dataclass
class Pair(Example):
    """A preference pair: its chosen and rejected sequences (Examples with the loss on the answer), its index
    in its file's encoded pairs (`key`), and as `ids` the longer sequence (what batching sorts by)."""

    chosen: Example = field(default_factory=lambda: Example([]))
    rejected: Example = field(default_factory=lambda: Example([]))
    index: int = 0
    key: str = ""


def _common_prefix(chosen: Any, rejected: Any) -> int:
    """Where an implicit prompt ends: the first differing message, or for text the last whitespace before the
    first differing character."""
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    if isinstance(chosen, str):
        while end > 0 and not chosen[end - 1].isspace():
            end -= 1
    return end


class Preference(Task):
    name: ClassVar[str] = TaskName.preference
    main_metric: str = "accuracy"
    higher_is_better: ClassVar[bool] = True
    packable: ClassVar[bool] = False  # a pair's two sequences are one unit of the loss

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reference: Any = None  # lmtrain.train.preference.Reference; None: loaded from init_from to evaluate

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        answers: dict[str, tuple[type, ...]] = {"chosen": (str, list), "rejected": (str, list)}
        return {"prompt": (str, list), **answers} if instruction else answers

    @classmethod
    def is_instruction(cls, fields: dict[str, str], record: dict) -> bool:
        """Whether the records hold an explicit prompt (else the prompt is the answers' shared prefix)."""
        return fields["prompt"] in record

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        info = super().build_info(cfg, fields, train_records)
        info.decoding = {
            "loss": str(cfg.loss),
            "beta": cfg.beta,
            "gamma": cfg.gamma,
            "label_smoothing": cfg.label_smoothing,
            # pairs were conversations: `generate` renders its prompt as a user turn too
            "conversational": bool(train_records and isinstance(train_records[0].get(fields["chosen"]), list)),
        }
        return info

    # ---- records --------------------------------------------------------------------------------
    def _split(self, record: dict) -> tuple[Any, Any, Any]:
        chosen, rejected = record[self.info.fields["chosen"]], record[self.info.fields["rejected"]]
        if self.info.instruction:
            return record[self.info.fields["prompt"]], chosen, rejected
        if type(chosen) is not type(rejected):
            raise chat.ChatError("chosen and rejected are not both text or both messages")
        end = _common_prefix(chosen, rejected)
        return chosen[:end], chosen[end:], rejected[end:]

    def _answer(self, prompt: Any, answer: Any) -> tuple[list[int], list[int], list[bool]]:
        """(prompt ids, answer ids, answer loss mask) of a text or conversational prompt and answer."""
        if isinstance(prompt, str) and isinstance(answer, str):
            prompt_ids = self.start + self._encode([prompt], "prompt")[0] + [self.eot]
            answer_ids = self._encode([answer], "answer")[0] + [self.eot]
            return prompt_ids, answer_ids, [True] * len(answer_ids)
        if isinstance(prompt, str) or isinstance(answer, str):
            raise chat.ChatError("the prompt and the answer are not both text or both messages")
        prompt_msgs = chat.check_messages(prompt)
        messages = chat.check_messages(prompt_msgs + list(answer))
        if not answer or any(m["role"] != "assistant" for m in answer):
            raise chat.ChatError("an answer holds a message that is not the assistant's")
        prompt_ids = self._chat(prompt_msgs, True)[0]
        ids, mask = self._chat(messages, False)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise chat.ChatError("the chat template does not render the prompt as the start of the conversation")
        return prompt_ids, ids[len(prompt_ids) :], mask[len(prompt_ids) :]

    def _chat(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
        result = self.chats.encode([messages], add_generation_prompt)[0]
        if isinstance(result, chat.ChatError):
            raise result
        return result

    def _pair(self, record: dict, index: int, key: str) -> Pair | str:
        """The record's pair, or the SKIPS reason it is skipped for; "truncated" marks a cut pair."""
        try:
            prompt, chosen, rejected = self._split(record)
            if not (chosen.strip() if isinstance(chosen, str) else any(m.get("content") for m in chosen)):
                return "empty_answer"
            if not (rejected.strip() if isinstance(rejected, str) else any(m.get("content") for m in rejected)):
                return "empty_answer"
            if chosen == rejected:
                return "identical_answers"
            p, c, c_mask = self._answer(prompt, chosen)
            _, r, r_mask = self._answer(prompt, rejected)
        except (chat.ChatError, AttributeError, TypeError):
            return "bad_messages"
        limit = self.max_seq_len + 1
        if len(p) >= self.max_seq_len:
            return "prompt_too_long"
        truncated = len(p) + max(len(c), len(r)) > limit
        if truncated:  # the prompt gives up its start down to half the context, then the answers their end
            p = p[-max(limit - max(len(c), len(r)), min(len(p), limit // 2)) :]
            room = limit - len(p)
            c, c_mask, r, r_mask = c[:room], c_mask[:room], r[:room], r_mask[:room]
        sides = [Example(p + ids, loss_mask=[False] * len(p) + m) for ids, m in ((c, c_mask), (r, r_mask))]
        pair = Pair(max(sides, key=lambda e: len(e.ids)).ids, chosen=sides[0], rejected=sides[1], index=index, key=key)
        pair.reference = "truncated" if truncated else None
        return pair

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        pairs: list[Example] = []
        skipped = dict.fromkeys(SKIPS, 0)
        truncated = 0
        for record in records:
            pair = self._pair(record, len(pairs), key)
            if isinstance(pair, str):
                skipped[pair] += 1
                continue
            truncated += pair.reference == "truncated"
            pair.reference = None
            pairs.append(pair)
        for reason, n in skipped.items():
            self.counts[f"skipped_{key.split('.')[-1]}_{reason}"] = n
            if n:
                log.warning("%s: skipped %d of %d pairs: %s", key, n, len(records), SKIPS[reason])
        if not pairs:
            reasons = ", ".join(f"{n} {SKIPS[r]}" for r, n in skipped.items() if n)
            raise UserError(f"{key}: no usable preference pair (all {len(records)} skipped: {reasons})")
        return pairs, truncated

    # ---- batches --------------------------------------------------------------------------------
    def collate(self, examples: list[Example], ignore_index: int = IGNORE) -> tuple[Any, Any]:
        """(tokens [2B, T], {targets [2B, T], sequence_targets [B, T], pairs [B], key, ignore_index}): the B
        chosen sequences, then the B rejected ones, right-padded; targets are ignore_index outside the answers,
        sequence_targets (ORPO's NLL) the chosen sequences' next tokens, prompt included."""
        pairs = [e for e in examples if isinstance(e, Pair)]
        sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        width = max(len(e.ids) for e in sides) - 1
        tokens = torch.full((len(sides), width), self.eot, dtype=torch.long)
        targets = torch.full((len(sides), width), ignore_index, dtype=torch.long)
        sequence_targets = torch.full((len(pairs), width), ignore_index, dtype=torch.long)
        for row, e in enumerate(sides):
            tokens[row, : len(e.ids) - 1] = torch.tensor(e.ids[:-1])
            targets[row, : len(e.ids) - 1] = e.targets(ignore_index)
            if row < len(pairs):
                sequence_targets[row, : len(e.ids) - 1] = torch.tensor(e.ids[1:])
        index = torch.tensor([p.index for p in pairs])
        extra = {"sequence_targets": sequence_targets, "pairs": index, "key": pairs[0].key}
        return tokens, {"targets": targets, **extra, "ignore_index": ignore_index}

    def input_length(self, example: Example) -> int:
        """Tokens the model reads for a pair: both its sequences."""
        if isinstance(example, Pair):
            return len(example.chosen.ids) + len(example.rejected.ids) - 2
        return super().input_length(example)

    def prompt_ids(self, record: dict) -> list[int]:
        """Where generation starts: the record's prompt (its explicit prompt, or the answers' shared start)."""
        prompt = record[self.info.fields["prompt"]] if self.info.instruction else self._split(record)[0]
        if isinstance(prompt, str):
            return self.start + self._encode([prompt], "prompt")[0] + [self.eot]
        return self._chat(chat.check_messages(prompt), True)[0]

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """As the training prompts were framed: a user turn in the chat template, or text then EOT."""
        if self.info.decoding.get("conversational"):
            return self.chat_turn_ids(prompt, system)
        return self.start + self._encode([prompt], "prompt")[0] + [self.eot]

    # ---- training and scoring -------------------------------------------------------------------
    def objective(
        self,
        cfg: FinetuneConfig,
        model: TransformerLM,
        placement: Placement,
        examples: list[Example],
        run_dir: Path,
        resuming: bool,
    ) -> Objective | None:
        """The preference objective (lmtrain.train.preference), its reference made ready."""
        device, main = placement.device, placement.is_main
        return build_objective(self, cfg, model, device, examples, run_dir, resuming, main)

    @torch.no_grad()
    def evaluate(
        self,
        model: TransformerLM,
        examples: list[Example],
        *,
        batch_size: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> dict:
        """`accuracy` (the fraction of pairs whose chosen reward is the higher), mean reward `margin`, mean
        chosen and rejected rewards and the mean preference `loss`."""
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        for batch in fixed_batches(examples, batch_size, self.collate):
            sums += score_pairs(self, model, batch, device, amp_dtype)
        n = len(examples)
        loss, chosen, rejected, accuracy, margin = (v / n for v in sums.tolist())
        rewards = {"chosen_reward": chosen, "rejected_reward": rejected}
        return {"loss": loss, "accuracy": accuracy, "margin": margin, **rewards}

    @classmethod
    def reference_models(cls, cfg: FinetuneConfig) -> int:
        """One frozen copy of init_from for a loss with a reference, none with task.reference=precompute (freed
        before training), adapter=lora (the adapters switched off) or a reference-free loss."""
        t = cfg.task
        needed = t.loss not in REFERENCE_FREE and t.reference is Reference.model
        return int(needed and cfg.adapter.name is not AdapterName.lora)

    @staticmethod
    def needs_reference(info: TaskInfo) -> bool:
        """Whether the run's loss compares the policy with a reference model."""
        return PreferenceLoss(info.decoding.get("loss", "dpo")) not in REFERENCE_FREE
