"""Text -> label: a head reads the hidden state at the text's last token (or the mean of all); scored by
accuracy and macro-F1 with per-class scores."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import torch

from lmtrain.config import FinetuneConfig, TaskConfig
from lmtrain.config.choices import TaskName
from lmtrain.core.errors import UserError
from lmtrain.data.examples import Example
from lmtrain.model.transformer import TransformerLM
from lmtrain.tasks import metrics
from lmtrain.tasks.base import IGNORE, Task, TaskInfo

log = logging.getLogger("lmtrain")


def label_index(labels: list) -> dict[str, int]:
    """Label text -> class id. Labels match by their text, so 1 in one file is "1" in another."""
    return {str(label): i for i, label in enumerate(labels)}


class Classification(Task):
    name: ClassVar[str] = TaskName.classification
    main_metric: str = "accuracy"
    higher_is_better: ClassVar[bool] = True
    classifies: ClassVar[bool] = True
    generates: ClassVar[bool] = False
    packable: ClassVar[bool] = False  # one label per sequence

    @classmethod
    def roles(cls, instruction: bool = False) -> dict[str, tuple[type, ...]]:
        return {"text": (str,), "label": (int, str)}

    @classmethod
    def build_info(cls, cfg: TaskConfig, fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
        """Also the label values of data.train, sorted: one type for all, at least two of them."""
        info = super().build_info(cfg, fields, train_records)
        if train_records is None:
            return info
        raw = [r[fields["label"]] for r in train_records]
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
                f"data.label_field: '{fields['label']}' has {len(values)} distinct value(s) in "
                "data.train; classification needs at least 2"
            )
        info.labels = sorted(values)
        return info

    @property
    def labels(self) -> list:
        assert self.info.labels is not None, "a classification task has its labels (build_info, task.json)"
        return self.info.labels

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def _examples(self, records: list[dict], key: str) -> tuple[list[Example], int]:
        index = label_index(self.labels)
        examples, truncated = self.encode_texts(self._column(records, "text"), key)
        for example, label in zip(examples, self._column(records, "label"), strict=True):
            if str(label) not in index:
                known = ", ".join(repr(v) for v in self.labels)
                raise UserError(
                    f"data.label_field: label {label!r} in {key} was not seen in data.train (known: {known})"
                )
            example.label = index[str(label)]
        return examples, truncated

    def collate(self, examples: list[Example], ignore_index: int = IGNORE) -> tuple[Any, torch.Tensor]:
        """({tokens [B, T] right-padded, last_positions [B]}, labels [B])."""
        width = max(len(e.ids) for e in examples)
        tokens = torch.full((len(examples), width), self.eot, dtype=torch.long)
        for row, e in enumerate(examples):
            tokens[row, : len(e.ids)] = torch.tensor(e.ids)
        last = torch.tensor([len(e.ids) - 1 for e in examples])
        return {"tokens": tokens, "last_positions": last}, torch.tensor([e.label for e in examples])

    def input_length(self, example: Example) -> int:
        return len(example.ids)

    def fit_head(self, model: TransformerLM, cfg: TaskConfig, start: TaskInfo | None) -> None:
        """A fresh head for a new label set (init_from's head is kept for the same labels); the LM head is
        frozen, unused by class logits (and DDP needs every trained parameter to get a gradient)."""
        same_labels = start is not None and start.labels == self.labels
        if model.config.num_classes != self.num_classes or not same_labels:
            model.add_classifier(self.num_classes, cfg.pooling)
        else:
            model.config = dataclasses.replace(model.config, pooling=cfg.pooling)
        if not model.config.tie_embeddings:
            model.lm_head.requires_grad_(False)

    def loss_options(self, cfg: FinetuneConfig, train_examples: list[Example]) -> dict[str, Any]:
        """task.class_weights=balanced: each class weighed by its inverse frequency (mean weight 1)."""
        if cfg.task.class_weights != "balanced":
            return {}
        per_class = torch.bincount(torch.tensor([e.label for e in train_examples]), minlength=self.num_classes)
        class_weights = len(train_examples) / (self.num_classes * per_class.clamp(min=1).float())
        log.info("class weights: %s", dict(zip(map(str, self.labels), class_weights.tolist(), strict=True)))
        return {"class_weights": class_weights}

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
        """`loss`, accuracy, macro-F1 and per-class precision/recall/F1/support."""
        loss, predictions, labels = self._scored(model, examples, batch_size, device, amp_dtype, predict=True)
        return {"loss": loss, **metrics.classification_report(predictions, labels, [str(v) for v in self.labels])}
