"""Reading a Hugging Face model folder (config.json, safetensors weights, tokenizer.json) into lmtrain's model.

The model is built without memory (meta device), given uninitialised storage once, and each weight is copied
in as it is read from the safetensors files (memory-mapped), so loading never holds two copies of the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import folder_file, read_folder_json, read_folder_text, safetensors_shapes
from lmtrain.data.tokenizer import plain_text, side_files
from lmtrain.hf.families import config_from_hf, weight_layout
from lmtrain.hf.layout import IGNORED, Family
from lmtrain.model.transformer import TransformerConfig, TransformerLM

_BLOCK = re.compile(r"(?:h|model\.layers)\.(\d+)\.")
CONVERT_HINT = (
    "convert it once with transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path) "
    "writes model.safetensors"
)


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json and no lmtrain model.json."""
    return (path / "config.json").is_file() and not (path / "model.json").is_file()


def weight_files(folder: Path, key: str) -> dict[str, Path]:
    """Tensor name -> real path of its safetensors file: model.safetensors, or the shards
    model.safetensors.index.json names (each inside the folder, and holding the tensors listed for it)."""
    index = "model.safetensors.index.json"
    if (folder / index).exists() or (folder / index).is_symlink():
        weight_map = read_folder_json(folder, index, key).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{key}: '{folder / index}' has no weight_map")
        named = next((name for name in weight_map.values() if not isinstance(name, str)), None)
        if named is not None:
            raise UserError(f"{key}: '{folder / index}' names the file {named!r}, which is not a file name")
        real = {name: folder_file(folder, name, key) for name in set(weight_map.values())}
        return {tensor: real[name] for tensor, name in weight_map.items()}
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors").is_symlink():
        single = folder_file(folder, "model.safetensors", key)
        return dict.fromkeys(safetensors_shapes(single, key), single)
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pth")):
        raise UserError(
            f"{key}: '{folder}' has only pickle weights (pytorch_model.bin), which lmtrain never loads; " + CONVERT_HINT
        )
    raise UserError(f"{key}: '{folder}' has no model.safetensors or model.safetensors.index.json")


def weight_shapes(folder: Path, files: dict[str, Path], key: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors headers (each checked against its file's size); a tensor the
    index lists for a file that does not hold it is a UserError."""
    headers = {path: safetensors_shapes(path, key) for path in set(files.values())}
    shapes = {}
    for name, path in files.items():
        if name not in headers[path]:
            raise UserError(f"{key}: '{folder}' lists weight '{name}' in '{path.name}', which does not hold it")
        shapes[name] = headers[path][name]
    return shapes


def read_config(folder: Path, key: str) -> TransformerConfig:
    hf = read_folder_json(folder, "config.json", key)
    try:
        return config_from_hf(hf)
    except UserError as err:
        raise UserError(f"{key}: {folder / 'config.json'}: {str(err).removeprefix('config.json: ')}") from None


def _prefix(family: Family, names: Collection[str]) -> str:
    """The family's state-dict prefix if the folder's tensor names carry it (GPT-2 folders may not)."""
    return family.prefix if family.prefix + family.source("token_embedding.weight").names[0] in names else ""


def check_shapes(config: TransformerConfig, shapes: dict[str, list[int]], folder: Path, key: str) -> None:
    """config.json against the weights' shapes, before anything is allocated: the embedding and the number of
    blocks first (cheap, and bounding what follows), then every tensor of the model (built on the meta device).
    Each mismatch is a UserError naming the tensor."""
    family = weight_layout(config)
    prefix = _prefix(family, shapes)
    embedding_name = prefix + family.source("token_embedding.weight").names[0]
    blocks = {match.group(1) for name in shapes if (match := _BLOCK.match(name.removeprefix(prefix)))}
    embedding = shapes.get(embedding_name)
    if embedding != [config.vocab_size, config.d_model] or len(blocks) != config.num_layers:
        raise UserError(
            f"{key}: '{folder / 'config.json'}' does not match the weights (embedding {embedding}, {len(blocks)} "
            f"blocks; config.json says [{config.vocab_size}, {config.d_model}], {config.num_layers} blocks)"
        )
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = TransformerLM(config).state_dict()
    for name, target in expected.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        where = family.source(name)
        parts = [shapes.get(n if n.startswith("lm_head") else prefix + n) for n in where.names]
        if any(part is None for part in parts):
            continue  # load_weights names the missing tensor
        rows = sum(part[0] if part else 0 for part in parts)
        shape = [rows, *parts[0][1:]] if parts[0] else []
        if where.transposed:
            shape = shape[::-1]
        if shape != list(target.shape):
            raise UserError(
                f"{key}: weight '{prefix}{where.names[0]}' has shape {parts[0]}, config.json implies "
                f"{list(target.shape)}"
            )


def load_weights(model: TransformerLM, folder: Path, key: str) -> None:
    """(After `check_shapes`.) Copy every parameter of `model` from the folder's safetensors, mapping names
    (and GPT-2's transposed Conv1D weights); a missing or unexpected tensor is a UserError naming it."""
    files = weight_files(folder, key)
    family = weight_layout(model.config)
    prefix = _prefix(family, files)
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
            where = family.source(name)
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
    if not (path.exists() or path.is_symlink()):
        raise UserError(
            f"{key}: '{folder}' has no tokenizer.json (lmtrain reads the fast-tokenizer format; "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path) writes one)"
        )
    try:
        tokenizer = plain_text(Tokenizer.from_str(read_folder_text(folder, "tokenizer.json", key)))
    except UserError:
        raise
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
    check_shapes(config, weight_shapes(folder, weight_files(folder, key), key), folder, key)  # before allocating
    with torch.device("meta"):
        model = TransformerLM(config)
    try:
        model.to_empty(device="cpu")
    except (RuntimeError, MemoryError):  # what the weights' files really hold, but more than this machine has
        size = sum(p.numel() * 4 for p in model.parameters()) / 1e9
        raise UserError(
            f"{key}: the model in '{folder}' needs {size:.1f} GB in fp32, more than can be allocated"
        ) from None
    if config.tie_embeddings:  # to_empty gives the two names separate storage
        model.lm_head.weight = model.token_embedding.weight
    if config.position == "rope":
        model.init_rope()
    load_weights(model, folder, key)
    return model.to(device), tokenizer


def side_files_from_hf(folder: Path, key: str) -> dict[str, str]:
    """tokenizer_config.json, chat_template.jinja and a generation_config.json (made from config.json's token
    ids when the folder has none), to carry into checkpoints so the model keeps its special tokens."""
    files = side_files(folder, key)
    if "generation_config.json" not in files:
        hf = read_folder_json(folder, "config.json", key)
        ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        files["generation_config.json"] = json.dumps(ids, indent=2)
    return files
