"""Loading a trained model for use: from a checkpoint, a run dir, or an export (see lmtrain.export)."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer

from lmtrain import checkpoint
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import UserError
from lmtrain.export import EXPORT_MARKER, load_export_weights
from lmtrain.model import TransformerConfig, TransformerLM
from lmtrain.tasks import TaskInfo


def load_model(path: str, device: torch.device, key: str = "ckpt") -> tuple[TransformerLM, Tokenizer]:
    """A model and tokenizer from a checkpoint (or run dir, or `latest`); `key` names the config key."""
    source = checkpoint.resolve(path, key)
    with checkpoint.readable(source, key):
        config = TransformerConfig(**json.loads((source / "model.json").read_text()))
        tokenizer = load_tokenizer(str(source / "tokenizer.json"))
        if tokenizer.get_vocab_size() != config.vocab_size:
            raise UserError(
                f"{key}: the tokenizer in '{source}' has {tokenizer.get_vocab_size()} entries but the model's "
                f"vocabulary has {config.vocab_size}"
            )
        model = TransformerLM(config)
        if (source / EXPORT_MARKER).is_file():
            load_export_weights(model, source)
        else:
            checkpoint.load_weights(model, source)
    return model.to(device), tokenizer


def load_task_info(path: str, key: str = "ckpt") -> TaskInfo | None:
    """The task a finetuned checkpoint was trained on (None for a pretrained one)."""
    source = checkpoint.resolve(path, key)
    if not (source / "task.json").is_file():
        return None
    with checkpoint.readable(source, key):
        return TaskInfo(**json.loads((source / "task.json").read_text()))
