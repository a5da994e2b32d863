"""task=rl's rollouts: each optimizer step's prompts sampled group_size times with lmtrain's KV-cache generator,
scored by the rewards, and turned into the GRPO objective's micro-batches (lmtrain.train.grpo).

Sampling runs with the model in eval mode under no_grad, with a generator seeded from (seed, step, process):
a resumed run samples the same completions. Prompts of one length share one generate call (every group of
the step at once when the prompts are equally long; the generator pads no prompt). A completion ends at the
model's end-of-text token (kept, and trained on, as TRL does) or after task.max_new_tokens tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmtrain.data.examples import Example
from lmtrain.model.generate import generate
from lmtrain.model.lora import adapters_off
from lmtrain.tasks import rewards
from lmtrain.train import grpo

if TYPE_CHECKING:
    from lmtrain.tasks.rl import RL
    from lmtrain.train.trainer import Trainer

IGNORE = -100


@dataclass
class Prompt(Example):
    """A prompt's tokens (`ids`, ending where the answer starts), its record, and where it came from."""

    record: dict = field(default_factory=dict)
    where: str = ""  # e.g. "data.train record 7", for a reward's error


@dataclass
class Sampling:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    scale_rewards: bool


def sample(task: RL, model: Any, prompts: list[Prompt], n: int, s: Sampling, generator: Any) -> list[list[int]]:
    """`n` completions (token ids, with the end token when one was produced) of every prompt, prompt-major:
    row i * n + j is prompt i's j-th. temperature 0 decodes greedily."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p.ids), []).append(i)
    for length, members in sorted(by_length.items()):
        batch = torch.tensor([prompts[i].ids for i in members], device=device).repeat_interleave(n, 0)
        new = generate(
            model,
            batch,
            s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            generator=generator,
            stop_tokens=[task.eot],
        )[:, length:].tolist()
        for row, ids in enumerate(new):
            end = ids.index(task.eot) + 1 if task.eot in ids else len(ids)
            out[members[row // n] * n + row % n] = ids[:end]
    return out


def score_all(task: RL, prompts: list[Prompt], completions: list[list[int]], n: int) -> torch.Tensor:
    """[rewards, prompts, n] float64: each reward of each completion (unweighted)."""
    texts = task.tokenizer.decode_batch([[t for t in c if t != task.eot] for c in completions])
    table = torch.zeros(len(task.reward_fns), len(prompts), n, dtype=torch.float64)
    for r, (name, fn) in enumerate(task.reward_fns.items()):
        for row, text in enumerate(texts):
            p = prompts[row // n]
            prompt = p.record[task.info.fields["prompt"]]
            table[r, row // n, row % n] = rewards.score(name, fn, prompt, text, p.record, p.where)
    return table


def collate(prompts: list[Prompt], completions: list[list[int]], advantages: torch.Tensor, eot: int) -> tuple:
    """(tokens [B, T], {targets [B, T], mask [B, T], advantages [B]}) of prompt + completion rows, right-padded
    with `eot`; mask marks the completion's targets."""
    n = len(completions) // len(prompts)
    rows = [prompts[i // n].ids + c for i, c in enumerate(completions)]
    width = max(len(r) for r in rows) - 1
    tokens = torch.full((len(rows), width), eot, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, : len(row) - 1] = torch.tensor(row[1:])
        mask[i, len(prompts[i // n].ids) - 1 : len(row) - 1] = True
    return tokens, {"targets": targets, "mask": mask, "advantages": advantages.float()}


class Rollouts:
    """Turns a step's prompt micro-batches into GRPO micro-batches (`step`), logging through the objective."""

    def __init__(self, task: RL, sampling: Sampling, objective: grpo.GRPOObjective, reference: Any, seed: int):
        self.task, self.s, self.objective, self.seed = task, sampling, objective, seed
        self.reference = reference  # None: no KL term; "adapters": the policy with LoRA off; else a frozen model
        self.last_end: float | None = None

    def step(self, trainer: Trainer, micro_batches: list[tuple[list[Prompt], Any]]) -> list[tuple[Any, dict]]:
        started = time.perf_counter()
        model, n, add = trainer.model, self.s.group_size, self.objective.add
        if self.last_end is not None:  # the previous step's training, and any validation or checkpoint since
            add("time_training_s", started - self.last_end, 1)
        generator = grpo.step_generator(self.seed, trainer.state.step, trainer.placement.rank, trainer.device)
        prompts = [p for batch, _ in micro_batches for p in batch]
        with torch.no_grad(), trainer.autocast():
            completions = sample(self.task, model, prompts, n, self.s, generator)
        sampled = time.perf_counter()
        table = score_all(self.task, prompts, completions, n)
        total = torch.einsum("r,rpn->pn", self.task.weights, table)
        advantages = grpo.group_advantages(total, self.s.scale_rewards).flatten()
        add("time_sampling_s", sampled - started, 1)
        add("time_scoring_s", time.perf_counter() - sampled, 1)
        self._log(table, total, completions)
        batches, start = [], 0
        for batch, _ in micro_batches:
            rows = slice(start * n, (start + len(batch)) * n)
            tokens, t = collate(batch, completions[rows], advantages[rows], self.task.eot)
            if self.reference is not None:
                t["ref"] = self._reference_logps(trainer, tokens, t["targets"])
            batches.append((tokens, t))
            start += len(batch)
        model.train()
        self.last_end = time.perf_counter()
        return batches

    @torch.no_grad()
    def _reference_logps(self, trainer: Trainer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        model = trainer.model
        model.eval()
        if self.reference == "adapters":
            with adapters_off(model):
                logits = trainer.forward(tokens, model)
        else:
            logits = trainer.forward(tokens, self.reference)
        return grpo.token_logps(logits, targets.to(logits.device), self.s.temperature).cpu()

    def _log(self, table: torch.Tensor, total: torch.Tensor, completions: list[list[int]]) -> None:
        add, units = self.objective.add, float(total.numel())
        for label, values in zip(self.task.reward_labels, table, strict=True):
            add(f"reward_{label}", float(values.sum()), units)
            add(f"reward_{label}_std", float(values.flatten().std(correction=0)), 1)
        add("reward", float(total.sum()), units)
        add("reward_std", float(total.flatten().std(correction=0)), 1)
        add("zero_std_groups", float((total.std(dim=1, correction=0) == 0).sum()), float(total.shape[0]))
        add("completion_length", float(sum(len(c) for c in completions)), float(len(completions)))
