"""Loading a trained model for use: from a checkpoint, a run dir, an export (see lmtrain.export) or a Hugging
Face model folder (see lmtrain.hf)."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer

from lmtrain import checkpoint, checkpoint_meta
from lmtrain.data.tokenizer import SpecialTokens, side_files, special_tokens
from lmtrain.errors import UserError
from lmtrain.export import EXPORT_MARKER, load_export_weights
from lmtrain.hf.load import is_hf_folder, load_hf, side_files_from_hf
from lmtrain.model import TransformerLM
from lmtrain.tasks import TaskInfo


def load_model(path: str, device: torch.device, key: str = "ckpt") -> tuple[TransformerLM, Tokenizer]:
    """A model and tokenizer from a checkpoint (or run dir, or `latest`), an export or a Hugging Face folder;
    `key` names the config key in errors."""
    source = checkpoint.resolve(path, key)
    if is_hf_folder(source):
        return load_hf(source, device, key)
    with checkpoint.readable(source, key):
        exported = (source / EXPORT_MARKER).is_file()
        config = checkpoint_meta.model_config(source, key, exact=not exported)
        tokenizer = checkpoint_meta.tokenizer(source, key)
        if tokenizer.get_vocab_size() > config.vocab_size:
            raise UserError(
                f"{key}: the tokenizer in '{source}' has {tokenizer.get_vocab_size()} entries but the model's "
                f"vocabulary has {config.vocab_size}"
            )
        model = TransformerLM(config)
        if exported:
            load_export_weights(model, source)
        else:
            checkpoint.load_weights(model, source)
    return model.to(device), tokenizer


def load_special_tokens(path: str, tokenizer: Tokenizer, key: str = "ckpt") -> SpecialTokens:
    """End-of-text, stop and BOS tokens and generation defaults of the model at `path`."""
    return special_tokens(tokenizer, checkpoint.resolve(path, key), key)


def load_side_files(path: str, key: str = "ckpt") -> dict[str, str]:
    """The tokenizer/generation files a checkpoint made from this model must carry (none for lmtrain's own)."""
    source = checkpoint.resolve(path, key)
    return side_files_from_hf(source, key) if is_hf_folder(source) else side_files(source)


def load_task_info(path: str, key: str = "ckpt") -> TaskInfo | None:
    """The task a finetuned checkpoint was trained on (None for a pretrained one)."""
    source = checkpoint.resolve(path, key)
    if not (source / "task.json").is_file():
        return None
    with checkpoint.readable(source, key):
        return TaskInfo(**json.loads((source / "task.json").read_text()))
