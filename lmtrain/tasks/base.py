"""A finetuning task: which record fields it reads, how records become examples and batches, how a model is
scored on them, and what a checkpoint records about it (task.json). One class per task (lmtrain.tasks.lm,
classification, seq2seq, qa, chat), chosen by name through lmtrain.tasks.registry.

Sequence formats (EOT is the model's end-of-text token: <|endoftext|> in every lmtrain tokenizer, the
tokenizer's eos_token in a model from Hugging Face; each sequence but a chat starts with BOS where the model's
tokenizer puts one in front of a text, as Llama's does):
  lm, plain text   text EOT, cut into windows of max_seq_len + 1 tokens; loss on every token
  lm, instruction  prompt EOT response EOT; loss on the response and its EOT only
  classification   text EOT; a head reads the hidden state at that last EOT
  seq2seq          source EOT target EOT; loss on the target; evaluation generates after source EOT
  qa               context EOT question EOT answer EOT; loss on the answer; evaluation generates it
  chat             the conversation in the model's chat template; loss on the assistant's turns
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tokenizers import Tokenizer

from lmtrain.checkpoint import files as checkpoint
from lmtrain.config import FinetuneConfig, TaskConfig
from lmtrain.core.distributed import Placement
from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import read_folder_text
from lmtrain.data import chat
from lmtrain.data.examples import Example, collate, collate_packed, fixed_batches
from lmtrain.data.tokenizer import end_of_text_id, unknown_chars, warn_unknown
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks import metrics
from lmtrain.train.losses import validation_loss
from lmtrain.train.objective import Objective

if TYPE_CHECKING:
    from lmtrain.train.trainer import Trainer

log = logging.getLogger("lmtrain")
IGNORE = -100


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


class Task:
    """The base task: next-token cross-entropy on `Example`s, scored by loss and perplexity. A task class
    overrides what differs: its roles, `_examples` (records -> examples), `evaluate`, `build_info`..."""

    name: ClassVar[str]  # the task's name: task=<name>, TaskInfo.name, the registry's key
    text_unit: ClassVar[str] = "line"  # how a .txt file becomes records: "line" or "document"
    main_metric: str = "loss"  # the validation metric that picks checkpoints/best (an instance may choose)
    higher_is_better: ClassVar[bool] = False
    classifies: ClassVar[bool] = False  # a head gives class logits (lmtrain predict), not next-token logits
    generates: ClassVar[bool] = True  # the finetuned model writes text (lmtrain generate)
    packable: ClassVar[bool] = True  # its examples may be packed into rows (data.packing)
    whole_records: ClassVar[bool] = False  # its examples keep every field of their records (rl: rewards read them)

    counts: dict[str, int]  # data counts the task adds to metrics.jsonl's step-0 record (records skipped...)

    def __init__(
        self,
        info: TaskInfo,
        tokenizer: Tokenizer,
        max_seq_len: int,
        eot: int | None = None,
        chat_template: str | None = None,
        bos: int | None = None,
        adds_bos: bool = False,
    ):
        """`eot`: the model's end-of-text id (`SpecialTokens.end_of_text`); default lmtrain's <|endoftext|>.
        `chat_template` (Jinja; None: lmtrain's default) and `bos`, which chat templates may write; with
        `adds_bos` (a tokenizer that puts BOS in front of every text, as Llama's) every sequence starts with it,
        as transformers and vLLM start it."""
        self.info, self.tokenizer, self.max_seq_len = info, tokenizer, max_seq_len
        self.counts = {}
        self.start = [bos] if adds_bos and bos is not None else []  # the ids every non-chat sequence starts with
        self.eot = eot if eot is not None else end_of_text_id(tokenizer)
        self.chat_template = chat_template or chat.DEFAULT_TEMPLATE
        self.chat_tokens = {
            "eos_token": tokenizer.id_to_token(self.eot),
            "bos_token": tokenizer.id_to_token(bos) if bos is not None else "",
        }

    @cached_property
    def chats(self) -> chat.ChatEncoder:
        """The run's encoder of conversations (its template and special tokens, its per-shape skeletons)."""
        return chat.ChatEncoder(self.tokenizer, self.chat_template, self.chat_tokens)

    # ---- records --------------------------------------------------------------------------------
    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        """Role (read from record field data.<role>_field) -> the value types a usable record holds there."""
        return {"text": (str,)}

    @classmethod
    def is_instruction(cls, fields: dict[str, str], record: dict) -> bool:
        """Whether records like `record` are the task's instruction variant (TaskInfo.instruction)."""
        return False

    @classmethod
    def record_types(cls, info: TaskInfo) -> dict[str, tuple[type, ...]]:
        """Record field -> the value types a usable record holds there, in role order."""
        return {info.fields[role]: types for role, types in cls.roles(info.instruction).items()}

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        """The task's record fields (role -> field of `fields`) and what it learns from data.train."""
        instruction = train_records is not None and cls.is_instruction(fields, train_records[0])
        return TaskInfo(str(cls.name), {r: fields[r] for r in cls.roles(instruction)}, instruction=instruction)

    @classmethod
    def plain_info(cls) -> TaskInfo:
        """The task with each role read from the field of its own name (a checkpoint without task.json)."""
        return TaskInfo(str(cls.name), {role: role for role in cls.roles()})

    # ---- encoding -------------------------------------------------------------------------------
    def _encode(self, texts: list[str], where: str = "input") -> list[list[int]]:
        warn_unknown(self.tokenizer, texts, where)
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _column(self, records: list[dict], role: str) -> list:
        return [r[self.info.fields[role]] for r in records]

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        """The examples of `records` and how many were truncated to fit the context."""
        raise NotImplementedError(f"{type(self).__name__} encodes no records")

    def encode(self, records: list[dict], key: str, source: str | None = None) -> list[Example]:
        """Examples of `records` (from the data file `source`, named by config key `key`); reports truncation.
        Raises UserError, naming the key and the file, when no example is left and why."""
        try:
            examples, truncated = self._examples(records, key)
        except UserError as err:
            message = str(err)
            if source and message.startswith(f"{key}: "):  # the file, beside the key that names it
                raise UserError(f"{key}: '{source}': {message[len(key) + 2 :]}") from None
            raise
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
            where = f"{key}: '{source}'" if source else key
            raise UserError(f"{where}: no tokens to {purpose}: every text is empty")
        return examples

    def encode_texts(self, texts: list[str], where: str = "input") -> tuple[list[Example], int]:
        """Whole-text inputs (the text, cut to fit, then EOT where a head reads) and how many were cut."""
        encoded = self._encode(texts, where)
        room = self.max_seq_len - 1 - len(self.start)
        truncated = sum(len(ids) > room for ids in encoded)
        return [Example(self.start + ids[:room] + [self.eot]) for ids in encoded], truncated

    def prompt_ids(self, record: dict) -> list[int]:
        """The tokens generation starts from for `record` (tasks that train on a prompt)."""
        raise UserError(f"task {self.info.name}: its records have no prompt to generate from")

    def user_prompt_ids(self, prompt: str, context: str | None, system: str | None) -> list[int] | None:
        """`lmtrain generate`'s prompt (and context, system message) as the task trained it; None: the
        plain prompt, framed by the tokenizer."""
        return None

    def chat_turn_ids(self, prompt: str, system: str | None) -> list[int]:
        """One user turn (after the `system` message, if any) in the model's chat template, with its
        generation prompt. UserError with the template's own message where it refuses the turn."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        warn_unknown(self.tokenizer, [prompt, *([system] if system else [])], "prompt")
        try:
            self.check_template(messages, True, "chat")
        except chat.ChatError as err:
            raise UserError(f"chat: {err}") from None
        result = self.chats.encode([messages], add_generation_prompt=True)[0]
        if isinstance(result, chat.ChatError):
            raise UserError(f"chat: {result}")
        return result[0]

    def check_template(self, messages: list[dict], add_generation_prompt: bool, key: str) -> None:
        """UserError where the tokenizer cannot encode the template's own text (a char-level tokenizer without
        the characters of its role headers): the model would read <|unk|> where each turn begins. ChatError
        where the template refuses the conversation."""
        missing = unknown_chars(self.tokenizer, [self.chats.template_text(messages, add_generation_prompt)])
        if missing:
            shown = " ".join(repr(c) for c in missing[:20])
            raise UserError(
                f"{key}: the model's tokenizer cannot encode the chat template's text (no entry for {shown})"
            )

    # ---- batches and training -------------------------------------------------------------------
    def collate(self, examples: list[Example], ignore_index: int = IGNORE) -> tuple[Any, torch.Tensor]:
        """A padded batch: (tokens [B, T], next-token targets [B, T]), ignore_index on prompt and padding."""
        return collate(examples, self.eot, ignore_index)

    def collate_rows(self, rows: list[list[Example]], ignore_index: int = IGNORE) -> tuple[Any, torch.Tensor]:
        """A packed batch (data.packing): ({tokens, document_ids}, targets), each [rows, width]."""
        return collate_packed(rows, self.eot, ignore_index)

    def input_length(self, example: Example) -> int:
        """Tokens the model reads for `example` (its last token is only a target)."""
        return len(example.ids) - 1

    @property
    def num_classes(self) -> int:
        """Outputs of the classification head the task trains (0: none, next-token logits)."""
        return 0

    def fit_head(self, model: TransformerLM, cfg: TaskConfig, start: TaskInfo | None) -> None:
        """The model's output head made ready for the task (`start`: init_from's task, if finetuned)."""
        if model.classifier is not None:
            model.remove_classifier()

    def loss_options(self, cfg: FinetuneConfig, train_examples: list[Example]) -> dict[str, Any]:
        """Keyword arguments of `lmtrain.train.build.build_trainer` for the task's training loss."""
        return {}

    @classmethod
    def reference_models(cls, cfg: FinetuneConfig) -> int:
        """Frozen model copies a run of the task holds beside the model it trains (`lmtrain plan` counts them)."""
        return 0

    def objective(
        self,
        cfg: FinetuneConfig,
        model: TransformerLM,
        placement: Placement,
        examples: list[Example],
        run_dir: Path,
        resuming: bool,
    ) -> Objective | None:
        """The task's own training objective (lmtrain.train.objective: its loss and the units it averages
        over), in place of loss.name's token loss; None: that loss. `examples`: every example the run scores."""
        return None

    def step_batches(self, trainer: Trainer, batches: list) -> list:
        """The micro-batches of one optimizer step as the trainer gets them, from the data's (task=rl samples
        its rollouts here)."""
        return batches

    # ---- scoring --------------------------------------------------------------------------------
    def _scored(
        self,
        model: TransformerLM,
        examples: list[Example],
        batch_size: int,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        predict: bool = False,
    ) -> tuple[float, list[int], list[int]]:
        """Mean loss per target over `examples` and, with `predict`, each target's argmax prediction and the
        target. Raises UserError when nothing is scored (a loss of 0 would read as a perfect score)."""
        model.eval()
        predictions: list[int] = []
        targets_seen: list[int] = []

        def logits_of(batch):
            inputs, targets = batch
            with autocast(device, amp_dtype):
                if isinstance(inputs, dict):
                    logits = model(**{k: v.to(device) for k, v in inputs.items()})
                else:
                    logits = model(inputs.to(device))
            if predict:
                predictions.extend(logits.argmax(-1).tolist())
                targets_seen.extend(targets.tolist())
            return logits

        total, count = validation_loss(fixed_batches(examples, batch_size, self.collate), logits_of, IGNORE)
        if count == 0:
            raise UserError("no tokens to score: every example is empty")
        return total.item() / count, predictions, targets_seen

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
        """The task's metrics on `examples`: `loss` (mean cross-entropy per target, nats) and `ppl`."""
        loss = self._scored(model, examples, batch_size, device, amp_dtype)[0]
        return {"loss": loss, "ppl": metrics.perplexity(loss)}


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def load_task_info(path: str, key: str = "ckpt") -> TaskInfo | None:
    """The task a finetuned checkpoint was trained on (None for a pretrained one)."""
    source = checkpoint.resolve(path, key)
    if not ((source / "task.json").exists() or (source / "task.json").is_symlink()):
        return None
    with checkpoint.readable(source, key):
        return TaskInfo(**json.loads(read_folder_text(source, "task.json", key)))
