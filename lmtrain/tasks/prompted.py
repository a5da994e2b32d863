"""Tasks that train on a target after a prompt (instruction lm, seq2seq, qa), and those of them that are
scored on what the model generates after the prompt (seq2seq, qa)."""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar, cast

import torch

from lmtrain.config import TaskConfig
from lmtrain.data.examples import Example
from lmtrain.model.generate import beam_search, generate
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks.base import Task, TaskInfo, autocast


class Prompted(Task):
    """Records of prompt roles then a target role: prompt EOT [prompt EOT ...] target EOT, loss on the target."""

    prompt_roles: ClassVar[tuple[str, ...]] = ()
    target_role: ClassVar[str] = ""

    def _prompt(self, parts: list[list[int]]) -> list[int]:
        """BOS (where the tokenizer starts texts with it), then each prompt role's ids then EOT."""
        ids: list[int] = list(self.start)
        for part in parts:
            ids += part + [self.eot]
        return ids

    def prompt_ids(self, record: dict) -> list[int]:
        """The tokens generation starts from (see `_prompt`)."""
        return self._prompt([self._encode([record[self.info.fields[role]]], role)[0] for role in self.prompt_roles])

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        limit, truncated, examples = self.max_seq_len + 1, 0, []
        targets = self._column(records, self.target_role)
        columns = [self._encode(self._column(records, role), role) for role in self.prompt_roles]  # one batch each
        for n, (target_text, target) in enumerate(zip(targets, self._encode(targets, key), strict=True)):
            prompt, target = self._prompt([column[n] for column in columns]), target + [self.eot]
            if len(prompt) + len(target) > limit:
                truncated += 1
                target = target[: limit - 1 - len(self.start)]
                # keep the end of the prompt, next to the target, after its BOS
                prompt = self.start + prompt[len(self.start) :][-(limit - len(target) - len(self.start)) :]
            examples.append(Example(prompt + target, loss_start=len(prompt), reference=str(target_text)))
        return examples, truncated

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        return self.prompt_ids({self.info.fields[self.prompt_roles[-1]]: prompt})


class Generated(Prompted):
    """A prompted task scored on the text the model generates after each prompt (`score`), by the decoding
    settings of TaskInfo.decoding."""

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        """The task's metrics of generated `hypotheses` against `references`."""
        raise NotImplementedError

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        info = super().build_info(cfg, fields, train_records)
        info.decoding = {
            "decoding": cfg.decoding,
            "num_beams": cfg.num_beams,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
        }
        return info

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
        """`loss` on the targets, plus the task's scores of the text generated after each prompt."""
        result = {"loss": self._scored(model, examples, batch_size, device, amp_dtype)[0]}
        with autocast(device, amp_dtype):
            hypotheses = self.generate(model, [e.ids[: e.loss_start] for e in examples], device, seed)
        references = cast(list[str], [e.reference for e in examples])  # _examples sets each reference
        return result | self.score(hypotheses, references)

    def generate(
        self, model: TransformerLM, prompts: list[list[int]], device: torch.device, seed: int = 0
    ) -> list[str]:
        """Decoded continuations of `prompts` up to EOT, by the task's decoding settings."""
        settings = {
            "decoding": "greedy",
            "num_beams": 4,
            "max_new_tokens": 64,
            "temperature": 1.0,
            "top_k": None,
            **self.info.decoding,
        }
        outputs: list[list[int]] = [[] for _ in prompts]
        if settings["decoding"] == "beam":
            for i, prompt in enumerate(prompts):
                outputs[i] = beam_search(
                    model, prompt, settings["max_new_tokens"], num_beams=settings["num_beams"], stop_token=self.eot
                )
            return [self.tokenizer.decode(ids).strip() for ids in outputs]
        by_length: dict[int, list[int]] = defaultdict(list)  # equal lengths batch without padding
        for i, prompt in enumerate(prompts):
            by_length[len(prompt)].append(i)
        generator = torch.Generator(device=device).manual_seed(seed)
        greedy = settings["decoding"] == "greedy"
        for length, indices in by_length.items():
            room = max(1, min(settings["max_new_tokens"], self.max_seq_len - length))
            for start in range(0, len(indices), 64):
                chunk = indices[start : start + 64]
                batch = torch.tensor([prompts[i] for i in chunk], device=device)
                out = generate(
                    model,
                    batch,
                    room,
                    temperature=0.0 if greedy else settings["temperature"],
                    top_k=settings["top_k"],
                    generator=generator,
                    stop_tokens=[self.eot],
                )
                for i, row in zip(chunk, out[:, length:].tolist(), strict=True):
                    outputs[i] = row[: row.index(self.eot)] if self.eot in row else row
        return [self.tokenizer.decode(ids).strip() for ids in outputs]
