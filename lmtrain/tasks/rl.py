"""Online reinforcement learning with verifiable rewards (task=rl, docs/rl.md): GRPO over prompts whose
answers a reward function scores (lmtrain.tasks.rewards), sampled by lmtrain's own generator
(lmtrain.tasks.rollouts), trained on the clipped objective of lmtrain.train.grpo.

Records: a prompt (data.prompt_field: text, framed as prompt EOT, or chat messages rendered with the model's
template and its generation prompt) plus whatever fields the rewards read (exact_match: task.answer_field).
Validation samples greedily and reports the mean weighted reward as `reward` (val_reward picks the best
checkpoint) and each reward's mean.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lmtrain.config import FinetuneConfig, TaskConfig
from lmtrain.config.choices import AdapterName, TaskName
from lmtrain.core.distributed import Placement
from lmtrain.core.errors import UserError
from lmtrain.data import chat
from lmtrain.data.examples import Example
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks import rewards
from lmtrain.tasks.base import Task, TaskInfo
from lmtrain.tasks.rollouts import Prompt, Rollouts, Sampling, sample, score_all
from lmtrain.train import grpo
from lmtrain.train.build import load_teacher
from lmtrain.train.objective import Objective

if TYPE_CHECKING:
    from lmtrain.train.trainer import Trainer

log = logging.getLogger("lmtrain")


def check_settings(t: TaskConfig) -> None:
    """The rules of task=rl's keys. Raises UserError."""
    names = rewards.names_of(t.reward)
    if t.reward_weights is not None and len(t.reward_weights) != len(names):
        raise UserError(f"task.reward_weights: {len(t.reward_weights)} weights for {len(names)} rewards")
    if t.group_size < 2:
        raise UserError(f"task.group_size: {t.group_size} must be at least 2 (advantages compare within a group)")
    if t.temperature <= 0:
        raise UserError(f"task.temperature: {t.temperature} must be positive to sample a group")
    if t.top_p is not None and not 0 < t.top_p <= 1:
        raise UserError(f"task.top_p: {t.top_p} must lie in (0, 1]")
    if not 0 <= t.epsilon < 1 or (t.epsilon_high is not None and t.epsilon_high < 0):
        raise UserError(f"task.epsilon: {t.epsilon} must lie in [0, 1) and task.epsilon_high be non-negative")
    if str(t.extract) == "regex" and not t.answer_pattern:
        raise UserError("task.extract=regex: set task.answer_pattern (its group 1 is the answer)")


def _is_conversation(messages: object) -> bool:
    try:
        chat.check_messages(messages)
    except chat.ChatError:
        return False
    return True


class RL(Task):
    name: ClassVar[str] = TaskName.rl
    main_metric: str = "reward"
    higher_is_better: ClassVar[bool] = True
    packable: ClassVar[bool] = False  # a prompt is sampled, not packed
    whole_records: ClassVar[bool] = True

    @classmethod
    def record_types(cls, info: TaskInfo) -> dict[str, tuple[type, ...]]:
        """The prompt's field, and exact_match's answer field when it is a reward."""
        types = super().record_types(info)
        if "exact_match" in info.decoding.get("reward", []):
            types[info.decoding["answer_field"]] = (str, int, float)
        return types

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"prompt": (str, list)}

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        check_settings(cfg)
        names = rewards.names_of(cfg.reward)
        decoding = {
            "reward": names,
            "reward_weights": list(cfg.reward_weights or [1.0] * len(names)),
            "extract": str(cfg.extract),
            "answer_pattern": cfg.answer_pattern,
            "format_pattern": cfg.format_pattern,
            "answer_field": cfg.answer_field,
            "max_new_tokens": cfg.max_new_tokens,
            # prompts were conversations: `generate` renders its prompt as a user turn too
            "conversational": bool(train_records and isinstance(train_records[0].get(fields["prompt"]), list)),
        }
        return TaskInfo(str(cls.name), {"prompt": fields["prompt"]}, decoding=decoding)

    # ---- rewards --------------------------------------------------------------------------------
    @cached_property
    def reward_fns(self) -> dict[str, rewards.Reward]:
        """Reward name -> function (user files imported on first use, only when named)."""
        return rewards.resolve(self.info.decoding["reward"], self.info.decoding)

    @property
    def reward_labels(self) -> list[str]:
        """Each reward's name in metrics (reward_<label>): a user function by its function name."""
        return [n.rsplit(":", 1)[-1] for n in self.info.decoding["reward"]]

    @property
    def weights(self) -> torch.Tensor:
        return torch.tensor(self.info.decoding["reward_weights"], dtype=torch.float64)

    # ---- records --------------------------------------------------------------------------------
    def _prompts(self, prompts: list) -> list[list[int] | None]:
        """Where generation starts for each prompt, encoded in one batch: text as BOS (where the tokenizer
        puts one), the text, EOT; messages in the chat template with its generation prompt. None for
        messages the template rejects."""
        texts = iter(self._encode([p for p in prompts if isinstance(p, str)], "prompt"))
        conversations = [p for p in prompts if not isinstance(p, str) and _is_conversation(p)]
        chats = iter(self.chats.encode(conversations, add_generation_prompt=True))
        result: list[list[int] | None] = []
        for p in prompts:
            if isinstance(p, str):
                result.append(self.start + next(texts) + [self.eot])
            elif not _is_conversation(p):
                result.append(None)
            else:
                encoded = next(chats)
                result.append(None if isinstance(encoded, chat.ChatError) else encoded[0])
        return result

    def prompt_ids(self, record: dict) -> list[int]:
        ids = self._prompts([record[self.info.fields["prompt"]]])[0]
        if ids is None:
            raise UserError("prompt: the chat template rejects these messages")
        return ids

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """As the training prompts were framed: a user turn in the chat template, or text then EOT."""
        if self.info.decoding.get("conversational"):
            return self.chat_turn_ids(prompt, system)
        return self.start + self._encode([prompt], "prompt")[0] + [self.eot]

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        room = self.max_seq_len - self.info.decoding["max_new_tokens"]
        prompts: list[Example] = []
        too_long = bad = 0
        encoded = self._prompts([record[self.info.fields["prompt"]] for record in records])
        for i, (record, ids) in enumerate(zip(records, encoded, strict=True)):
            if ids is None:
                bad += 1
                continue
            if len(ids) > room:
                too_long += 1
                continue
            prompts.append(Prompt(ids, record=record, where=f"{key} record {i + 1}"))
        name = key.split(".")[-1]
        self.counts[f"skipped_{name}_prompt_too_long"], self.counts[f"skipped_{name}_bad_messages"] = too_long, bad
        if too_long:
            log.warning(
                "%s: skipped %d of %d prompts longer than max_seq_len - task.max_new_tokens = %d tokens",
                key,
                too_long,
                len(records),
                room,
            )
        if bad:
            log.warning("%s: skipped %d of %d records whose messages the chat template rejects", key, bad, len(records))
        if not prompts:
            raise UserError(f"{key}: no usable prompt (all {len(records)} skipped)")
        return prompts, 0

    def collate(self, examples: list[Example], ignore_index: int = -100) -> tuple[Any, Any]:
        """The prompts themselves: the step's rollouts (step_batches) turn them into training batches."""
        return examples, None

    # ---- training -------------------------------------------------------------------------------
    def objective(
        self,
        cfg: FinetuneConfig,
        model: TransformerLM,
        placement: Placement,
        examples: list[Example],
        run_dir: Path,
        resuming: bool,
    ) -> Objective | None:
        """The GRPO objective (lmtrain.train.grpo) and the rollouts that feed it; with task.kl_beta > 0 the
        reference: the policy with its LoRA adapters off, else init_from loaded frozen."""
        t = cfg.task
        if str(cfg.trainer.strategy) == "fsdp":
            raise UserError("trainer.strategy=fsdp: task=rl runs single-process or ddp")
        high = t.epsilon if t.epsilon_high is None else t.epsilon_high
        settings = grpo.Settings(t.epsilon, high, t.kl_beta, t.temperature, str(t.normalize) == "sequence")
        objective = grpo.GRPOObjective(settings, placement.device)
        reference: Any = None
        if t.kl_beta != 0:
            assert cfg.init_from is not None, "init_from is checked before the run"
            if cfg.adapter.name is AdapterName.lora:
                reference = "adapters"
            else:
                reference = load_teacher(cfg.init_from, model, self.tokenizer.to_str(), placement.device)
        sampling = Sampling(t.group_size, t.max_new_tokens, t.temperature, t.top_k, t.top_p, t.scale_rewards)
        self.rollouts = Rollouts(self, sampling, objective, reference, cfg.trainer.seed)
        self.reward_fns  # noqa: B018  (user reward files load, and fail, before the first step)
        return objective

    def step_batches(self, trainer: Trainer, batches: list) -> list:
        return self.rollouts.step(trainer, batches)

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
        """`reward`: the mean weighted reward of greedy completions; `reward_<label>`: each reward's mean;
        `completion_length`: mean tokens per completion."""
        greedy = Sampling(1, self.info.decoding["max_new_tokens"], 0.0, None, None, False)
        prompts = [e for e in examples if isinstance(e, Prompt)]
        completions: list[list[int]] = []
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for start in range(0, len(prompts), batch_size):
                completions += sample(self, model, prompts[start : start + batch_size], 1, greedy, None)
        table = score_all(self, prompts, completions, 1)
        result = {"reward": float(torch.einsum("r,rpn->pn", self.weights, table).mean())}
        result |= {f"reward_{label}": float(v.mean()) for label, v in zip(self.reward_labels, table, strict=True)}
        result["completion_length"] = sum(len(c) for c in completions) / max(len(completions), 1)
        return result
