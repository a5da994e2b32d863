"""Reading a Hugging Face model folder (config.json, safetensors weights, tokenizer.json) into lmtrain's model.

The model is built without memory (meta device), given uninitialised storage once, and each weight is copied
in as it is read from the safetensors files (memory-mapped), so loading never holds two copies of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from lmtrain.core.errors import UserError
from lmtrain.data.tokenizer import SIDE_FILES, plain_text, read_json
from lmtrain.hf.families import IGNORED, config_from_hf, source
from lmtrain.model.transformer import TransformerConfig, TransformerLM

CONVERT_HINT = (
    "convert it once with transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path) "
    "writes model.safetensors"
)


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json and no lmtrain model.json."""
    return (path / "config.json").is_file() and not (path / "model.json").is_file()


def weight_files(folder: Path, key: str) -> dict[str, Path]:
    """Tensor name -> safetensors file: model.safetensors, or the shards model.safetensors.index.json names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, key).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{key}: '{index}' has no weight_map")
        files = {name: folder / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise UserError(f"{key}: '{path}' is listed in {index.name} but missing")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{key}: cannot read '{single}': {err}") from None
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pth")):
        raise UserError(
            f"{key}: '{folder}' has only pickle weights (pytorch_model.bin), which lmtrain never loads; " + CONVERT_HINT
        )
    raise UserError(f"{key}: '{folder}' has no model.safetensors or model.safetensors.index.json")


def read_config(folder: Path, key: str) -> TransformerConfig:
    hf = read_json(folder / "config.json", key)
    try:
        return config_from_hf(hf)
    except UserError as err:
        raise UserError(f"{key}: {folder / 'config.json'}: {str(err).removeprefix('config.json: ')}") from None


def load_weights(model: TransformerLM, folder: Path, key: str) -> None:
    """Copy every parameter of `model` from the folder's safetensors, mapping names (and GPT-2's transposed
    Conv1D weights); a missing or unexpected tensor, or a shape mismatch, is a UserError naming it."""
    files = weight_files(folder, key)
    family = "gpt2" if model.config.position == "learned" else "llama"  # the two weight layouts (families.py)
    prefix = "transformer." if family == "gpt2" and "transformer.wte.weight" in files else ""
    used: set[str] = set()

    def read(name: str) -> torch.Tensor:
        path = files.get(name)
        if path is None:
            raise UserError(f"{key}: missing weight '{name}' in '{folder}'")
        used.add(name)
        # a file opened per tensor: its memory map (which counts as resident once read) is released at once
        with safe_open(str(path), framework="pt") as f:
            if name not in f.keys():  # the index names the wrong shard
                raise UserError(f"{key}: model.safetensors.index.json puts weight '{name}' in '{path}', which lacks it")
            return f.get_tensor(name)

    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if name == "lm_head.weight" and model.config.tie_embeddings:
                continue
            where = source(family, name)
            parts = [read(prefix + n if not n.startswith("lm_head") else n) for n in where.names]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if where.transposed:
                tensor = tensor.t()
            if tensor.shape != target.shape:
                raise UserError(
                    f"{key}: weight '{prefix}{where.names[0]}' has shape {list(tensor.shape)}, config.json "
                    f"implies {list(target.shape)}"
                )
            target.copy_(tensor)
    tied_head = {"lm_head.weight"} if model.config.tie_embeddings else set()
    unexpected = sorted(n for n in files if n not in used and n not in tied_head and not IGNORED.search(n))
    if unexpected:
        raise UserError(
            f"{key}: '{folder}' holds weights this model does not use, e.g. '{unexpected[0]}' "
            f"({len(unexpected)} in all); is it a causal LM of that family?"
        )


def load_tokenizer(folder: Path, key: str, vocab_size: int) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{key}: '{folder}' has no tokenizer.json (lmtrain reads the fast-tokenizer format; "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path) writes one)"
        )
    try:
        tokenizer = plain_text(Tokenizer.from_file(str(path)))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise UserError(f"{key}: cannot read '{path}': {str(err).splitlines()[0]}") from None
    if tokenizer.get_vocab_size() > vocab_size:
        raise UserError(
            f"{key}: '{path}' has {tokenizer.get_vocab_size()} tokens but config.json's vocab_size is {vocab_size}"
        )
    return tokenizer


def load_hf(folder: Path, device: torch.device, key: str = "ckpt") -> tuple[TransformerLM, Tokenizer]:
    """An lmtrain model (fp32, on `device`) and tokenizer from a Hugging Face folder. Raises UserError for an
    unsupported model_type or option, missing/unexpected/misshapen weights, pickle-only weights or a missing
    tokenizer."""
    config = read_config(folder, key)
    tokenizer = load_tokenizer(folder, key, config.vocab_size)
    with torch.device("meta"):
        model = TransformerLM(config)
    model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty gives the two names separate storage
        model.lm_head.weight = model.token_embedding.weight
    if config.position == "rope":
        model.init_rope()
    load_weights(model, folder, key)
    return model.to(device), tokenizer


def side_files_from_hf(folder: Path, key: str) -> dict[str, str]:
    """tokenizer_config.json, chat_template.jinja and a generation_config.json (made from config.json's token
    ids when the folder has none), to carry into checkpoints so the model keeps its special tokens."""
    files = {name: (folder / name).read_text() for name in SIDE_FILES if (folder / name).is_file()}
    if "generation_config.json" not in files:
        hf = read_json(folder / "config.json", key)
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        files["generation_config.json"] = json.dumps(ids, indent=2)
    return files
