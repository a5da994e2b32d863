"""Loading a trained model for use: from a checkpoint, a run dir, an export (see lmtrain.checkpoint.export) or a Hugging
Face model folder (see lmtrain.hf)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint import meta as checkpoint_meta
from lmtrain.checkpoint.export import EXPORT_MARKER, load_export_weights
from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import folder_file
from lmtrain.data.tokenizer import SpecialTokens, side_files, special_tokens
from lmtrain.hf.load import is_hf_folder, load_hf, read_config, side_files_from_hf
from lmtrain.hf.load import load_tokenizer as hf_tokenizer
from lmtrain.model.lora import add_lora
from lmtrain.model.transformer import TransformerConfig, TransformerLM


def load_model(path: str, device: torch.device, key: str = "ckpt") -> tuple[TransformerLM, Tokenizer]:
    """A model and tokenizer from a checkpoint (or run dir, or `latest`), an export or a Hugging Face folder;
    `key` names the config key in errors."""
    source = checkpoint.resolve(path, key)
    if is_hf_folder(source):
        return load_hf(source, device, key)
    if (source / checkpoint.ADAPTER_FILE).is_file():
        return load_adapter(source, device, key)
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
            checkpoint.apply_ema(model, source)
    return model.to(device), tokenizer


def weights_digest(path: str | Path, key: str = "ckpt") -> str:
    """sha256 over the names and bytes of a model's weight files: what an adapter checks its base by."""
    source = checkpoint.resolve(path, key)
    digest = hashlib.sha256()
    for file in sorted(source.glob("*.safetensors")):
        if file.name in ("optimizer.safetensors", "rng.safetensors"):
            continue
        digest.update(file.name.encode())
        with open(folder_file(source, file.name, key), "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def adapter_record(base: str, digest: str, settings: dict, layers: list[str], key: str = "init_from") -> str:
    """adapter.json of an adapter run: its base (resolved path and `weights_digest`), the LoRA settings
    (rank, alpha, dropout) and the wrapped layers."""
    record = {"base": str(checkpoint.resolve(base, key)), "base_sha256": digest, **settings, "layers": layers}
    return json.dumps(record, indent=2)


def model_config(path: str, key: str = "ckpt") -> TransformerConfig:
    """The TransformerConfig of a checkpoint, export, adapter run or Hugging Face folder, without its weights."""
    source = checkpoint.resolve(path, key)
    if is_hf_folder(source):
        return read_config(source, key)
    return checkpoint_meta.model_config(source, key, exact=False)


def load_tokenizer(path: str, key: str = "ckpt") -> Tokenizer:
    """The tokenizer of a checkpoint, export, adapter run or Hugging Face folder, without loading weights."""
    source = checkpoint.resolve(path, key)
    if is_hf_folder(source):
        return hf_tokenizer(source, key, read_config(source, key).vocab_size)
    return checkpoint_meta.tokenizer(source, key)


def load_adapter(source: Path, device: torch.device, key: str) -> tuple[TransformerLM, Tokenizer]:
    """An adapter checkpoint: its base model (checked by content hash), wrapped in the recorded adapters,
    with the checkpoint's trained tensors loaded. A base that changed or moved is a one-line error."""
    with checkpoint.readable(source, key):
        record = json.loads((source / checkpoint.ADAPTER_FILE).read_text())
        config = checkpoint_meta.model_config(source, key)
        tokenizer = checkpoint_meta.tokenizer(source, key)
        base_path = Path(record["base"])
    if not base_path.exists():
        raise UserError(f"{key}: the adapter in '{source}' needs its base model '{base_path}', which is gone")
    if weights_digest(base_path, key) != record["base_sha256"]:
        raise UserError(
            f"{key}: the base model '{base_path}' changed since the adapter in '{source}' was trained "
            "(its weights' sha256 differs)"
        )
    model, _ = load_model(str(base_path), torch.device("cpu"), key)
    if config.num_classes and model.config.num_classes != config.num_classes:
        model.add_classifier(config.num_classes)
    model.config = dataclasses.replace(model.config, pooling=config.pooling)
    wrapped = add_lora(model, sorted({n.rsplit(".", 1)[-1] for n in record["layers"]}), **_lora_settings(record))
    if sorted(wrapped) != sorted(record["layers"]):
        raise UserError(f"{key}: '{source / checkpoint.ADAPTER_FILE}' names layers its base model does not have")
    with checkpoint.readable(source, key):
        checkpoint.load_weights(model, source, partial=True)
        checkpoint.apply_ema(model, source)
    return model.to(device), tokenizer


def _lora_settings(record: dict) -> dict:
    return {"rank": int(record["rank"]), "alpha": float(record["alpha"]), "dropout": float(record["dropout"])}


def load_special_tokens(path: str, tokenizer: Tokenizer, key: str = "ckpt") -> SpecialTokens:
    """End-of-text, stop and BOS tokens and generation defaults of the model at `path`."""
    return special_tokens(tokenizer, checkpoint.resolve(path, key), key)


def load_side_files(path: str, key: str = "ckpt") -> dict[str, str]:
    """The tokenizer/generation files a checkpoint made from this model must carry (none for lmtrain's own)."""
    source = checkpoint.resolve(path, key)
    return side_files_from_hf(source, key) if is_hf_folder(source) else side_files(source, key)
