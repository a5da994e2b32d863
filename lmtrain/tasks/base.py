"""Finetuning tasks: how records become examples, and how a model is scored on them.

Sequence formats (EOT is the model's end-of-text token: <|endoftext|> in every lmtrain tokenizer, the
tokenizer's eos_token in a model from Hugging Face):
  lm, plain text   text EOT, cut into windows of max_seq_len + 1 tokens; loss on every token
  lm, instruction  prompt EOT response EOT; loss on the response and its EOT only
  classification   text EOT; a head reads the hidden state at that last EOT
  seq2seq          source EOT target EOT; loss on the target; evaluation generates after source EOT
  qa               context EOT question EOT answer EOT; loss on the answer; evaluation generates it
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from tokenizers import Tokenizer

from lmtrain.checkpoint import files as checkpoint
from lmtrain.config import TaskConfig
from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import read_folder_text
from lmtrain.data import chat
from lmtrain.data.examples import Example, fixed_batches
from lmtrain.data.tokenizer import SpecialTokens, end_of_text_id, warn_unknown
from lmtrain.model.generate import beam_search, generate
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks import metrics
from lmtrain.train.losses import scored

log = logging.getLogger("lmtrain")
IGNORE = -100
MAIN_METRIC = {
    "lm": ("loss", False),
    "classification": ("accuracy", True),
    "seq2seq": ("bleu", True),
    "qa": ("exact_match", True),
    "chat": ("loss", False),
}  # task -> (metric, higher is better)


@dataclass
class TaskInfo:
    """What a finetuned checkpoint records about its task (task.json)."""

    name: str
    fields: dict[str, str]  # role -> record field, e.g. {"source": "en", "target": "fr"}
    labels: list | None = None  # classification: the label values, index = class id
    instruction: bool = False  # lm: prompt/response records rather than plain text
    decoding: dict = field(default_factory=dict)  # seq2seq/qa: decoding settings used for evaluation

    def to_dict(self) -> dict:
        return asdict(self)


def text_unit(task_name: str) -> str:
    """How a .txt file becomes records: whole documents for language modelling, lines otherwise."""
    return "document" if task_name == "lm" else "line"


def field_roles(name: str, instruction: bool) -> list[str]:
    return {
        "lm": ["prompt", "response"] if instruction else ["text"],
        "classification": ["text", "label"],
        "seq2seq": ["source", "target"],
        "qa": ["context", "question", "answer"],
        "chat": ["messages"],
    }[name]


def field_types(info: TaskInfo) -> dict[str, tuple[type, ...]]:
    """Record field -> the value types a usable record holds there: text, or a label (int or string)."""
    return {
        info.fields[role]: (int, str) if role == "label" else (list,) if role == "messages" else (str,)
        for role in field_roles(info.name, info.instruction)
    }


def label_index(labels: list) -> dict[str, int]:
    """Label text -> class id. Labels match by their text, so 1 in one file is "1" in another."""
    return {str(label): i for i, label in enumerate(labels)}


class Task:
    def __init__(
        self,
        info: TaskInfo,
        tokenizer: Tokenizer,
        max_seq_len: int,
        eot: int | None = None,
        chat_template: str | None = None,
        bos: int | None = None,
    ):
        """`eot`: the model's end-of-text id (`SpecialTokens.end_of_text`); default lmtrain's <|endoftext|>.
        chat: `chat_template` (Jinja; None: lmtrain's default) and `bos`, which templates may write."""
        self.info, self.tokenizer, self.max_seq_len = info, tokenizer, max_seq_len
        self.eot = eot if eot is not None else end_of_text_id(tokenizer)
        self.chat_template = chat_template or chat.DEFAULT_TEMPLATE
        self.chat_tokens = {
            "eos_token": tokenizer.id_to_token(self.eot),
            "bos_token": tokenizer.id_to_token(bos) if bos is not None else "",
        }
        self.main_metric, self.higher_is_better = MAIN_METRIC[info.name]
        self.classify = info.name == "classification"

    # ---- encoding -------------------------------------------------------------------------------
    def _encode(self, texts: list[str], where: str = "input") -> list[list[int]]:
        warn_unknown(self.tokenizer, texts, where)
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _column(self, records: list[dict], role: str) -> list:
        return [r[self.info.fields[role]] for r in records]

    def prompt_ids(self, record: dict) -> list[int]:
        """The tokens generation starts from (seq2seq, qa, instruction lm)."""
        roles = {"seq2seq": ["source"], "qa": ["context", "question"], "lm": ["prompt"]}[self.info.name]
        ids: list[int] = []
        for role in roles:
            ids += self._encode([record[self.info.fields[role]]], role)[0] + [self.eot]
        return ids

    def encode(self, records: list[dict], key: str) -> list[Example]:
        """Examples of `records` (from the data file named by config key `key`); reports truncation."""
        name, limit = self.info.name, self.max_seq_len + 1
        truncated = 0
        examples: list[Example] = []
        if name == "classification":
            assert self.info.labels is not None, "a classification task has its labels (build_task_info, task.json)"
            index = label_index(self.info.labels)
            texts = self._column(records, "text")
            examples, truncated = self.encode_texts(texts, key)
            for example, label in zip(examples, self._column(records, "label"), strict=True):
                if str(label) not in index:
                    known = ", ".join(repr(v) for v in self.info.labels)
                    raise UserError(
                        f"data.label_field: label {label!r} in {key} was not seen in data.train (known: {known})"
                    )
                example.label = index[str(label)]
        elif name == "chat":
            examples, truncated = self._encode_chats(records, key)
        elif name == "lm" and not self.info.instruction:
            for ids in self._encode(self._column(records, "text"), key):
                if not ids:  # an empty text has nothing to predict
                    continue
                ids = ids + [self.eot]  # windows overlap by one token so each token is predicted once
                examples += [Example(ids[i : i + limit]) for i in range(0, max(len(ids) - 1, 1), limit - 1)]
        else:
            target_role = {"lm": "response", "seq2seq": "target", "qa": "answer"}[name]
            targets = self._column(records, target_role)
            for record, target_text, target in zip(records, targets, self._encode(targets, key), strict=True):
                prompt, target = self.prompt_ids(record), target + [self.eot]
                if len(prompt) + len(target) > limit:
                    truncated += 1
                    target = target[: limit - 1]
                    prompt = prompt[-(limit - len(target)) :]  # keep the end of the prompt, next to the target
                examples.append(Example(prompt + target, loss_start=len(prompt), reference=str(target_text)))
        if truncated:
            log.warning(
                "%s: %d of %d examples exceed model.max_seq_len=%d tokens and were truncated",
                key,
                truncated,
                len(records),
                self.max_seq_len,
            )
        if not examples:
            purpose = "train on" if key == "data.train" else "score"
            raise UserError(f"{key}: no tokens to {purpose}: every text is empty")
        return examples

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The tokens generation starts from: `messages` and the template's assistant header."""
        try:
            return chat.tokenize(self.tokenizer, self.chat_template, messages, self.chat_tokens, True)[0]
        except chat.ChatError as err:
            raise UserError(f"ckpt: {err}") from None

    def _encode_chats(self, records: list[dict], key: str) -> tuple[list[Example], int]:
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

    def encode_texts(self, texts: list[str], where: str = "input") -> tuple[list[Example], int]:
        """Classification inputs (the text, cut to fit, then EOT where the head reads) and how many were cut."""
        encoded = self._encode(texts, where)
        truncated = sum(len(ids) + 1 > self.max_seq_len for ids in encoded)
        return [Example(ids[: self.max_seq_len - 1] + [self.eot]) for ids in encoded], truncated

    # ---- scoring --------------------------------------------------------------------------------
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
        """The task's metrics on `examples`: always `loss`, plus perplexity / accuracy and F1 (with
        per-class scores) / BLEU and chrF / exact match and F1."""
        model.eval()
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        total, count, predictions, labels = 0.0, 0, [], []
        for inputs, targets in fixed_batches(examples, batch_size, self.eot, IGNORE, self.classify):
            with autocast:
                if self.classify:
                    logits = model(**{k: v.to(device) for k, v in inputs.items()})
                else:
                    logits = model(inputs.to(device))
            targets = targets.to(device)
            loss, targets_scored = scored(logits, targets, IGNORE)
            total += loss.item()
            count += targets_scored
            if self.classify:
                predictions += logits.argmax(-1).tolist()
                labels += targets.tolist()
        if count == 0:  # a loss of 0 would read as a perfect score
            raise UserError("no tokens to score: every example is empty")
        result = {"loss": total / count}
        if self.info.name in ("lm", "chat"):
            result["ppl"] = metrics.perplexity(result["loss"])
        elif self.classify:
            assert self.info.labels is not None, "a classification task has its labels (build_task_info, task.json)"
            result.update(metrics.classification_report(predictions, labels, [str(v) for v in self.info.labels]))
        else:
            with autocast:
                hypotheses = self.generate(model, [e.ids[: e.loss_start] for e in examples], device, seed)
            references = cast(list[str], [e.reference for e in examples])  # encode sets each seq2seq/qa reference
            if self.info.name == "seq2seq":
                result.update(metrics.bleu_chrf(hypotheses, references))
            else:
                result.update(metrics.squad_scores(hypotheses, references))
        return result

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


def task_for(info: TaskInfo, tokenizer: Tokenizer, max_seq_len: int, special: SpecialTokens) -> Task:
    """The task with the model's own end-of-text token and chat template."""
    return Task(info, tokenizer, max_seq_len, special.end_of_text, special.chat_template, special.bos)


def build_task_info(cfg: TaskConfig, data_fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
    """The task's record fields, its labels (from the training records) and its decoding settings."""
    instruction = cfg.name == "lm" and train_records is not None and data_fields["prompt"] in train_records[0]
    roles = field_roles(cfg.name, instruction)
    info = TaskInfo(cfg.name, {r: data_fields[r] for r in roles}, instruction=instruction)
    if cfg.name == "classification" and train_records is not None:
        raw = [r[data_fields["label"]] for r in train_records]
        kinds = [str if isinstance(v, str) else int for v in raw]
        common = max(set(kinds), key=kinds.count)
        odd = next((i for i, kind in enumerate(kinds) if kind is not common), None)
        if odd is not None:  # one "positive" among 0/1 would silently make a third class
            raise UserError(
                f"data.label_field: label {raw[odd]!r} (record {odd + 1} of data.train) is a "
                f"{kinds[odd].__name__} but most labels are {common.__name__}s; use one type for all labels"
            )
        values = set(raw)
        if len(values) < 2:
            raise UserError(
                f"data.label_field: '{data_fields['label']}' has {len(values)} distinct value(s) in "
                "data.train; classification needs at least 2"
            )
        info.labels = sorted(values)
    if cfg.name in ("seq2seq", "qa"):
        info.decoding = {
            "decoding": cfg.decoding,
            "num_beams": cfg.num_beams,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
        }
    if cfg.name == "chat":  # how over-long conversations were handled travels with the checkpoint
        info.decoding = {"overlong": cfg.overlong}
    return info


def load_task_info(path: str, key: str = "ckpt") -> TaskInfo | None:
    """The task a finetuned checkpoint was trained on (None for a pretrained one)."""
    source = checkpoint.resolve(path, key)
    if not ((source / "task.json").exists() or (source / "task.json").is_symlink()):
        return None
    with checkpoint.readable(source, key):
        return TaskInfo(**json.loads(read_folder_text(source, "task.json", key)))
