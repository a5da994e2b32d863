"""Writing lmtrain's model as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load: config.json, safetensors (sharded with an index above a size),
tokenizer.json, tokenizer_config.json and generation_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmtrain.core.dtypes import HF_NAMES
from lmtrain.data.tokenizer import SpecialTokens
from lmtrain.hf.families import config_to_hf, family_of, split_sizes
from lmtrain.hf.layout import Family
from lmtrain.model.transformer import TransformerLM


def hf_state(model: TransformerLM, family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of `model` in `family`'s layout. A model without biases
    gets zero biases in a family that always has them (GPT-2), which leave its outputs unchanged."""
    prefix = family.prefix
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        where = family.source(name)
        names = [n if n.startswith("lm_head") else prefix + n for n in where.names]
        parts = tensor.split(split_sizes(model.config), dim=0) if len(names) > 1 else (tensor,)
        for hf_name, part in zip(names, parts, strict=True):
            yield hf_name, (part.t() if where.transposed else part).contiguous()
        if family.zero_biases and name.endswith(".weight") and not model.config.bias and "embedding" not in name:
            if name != "lm_head.weight":
                width = tensor.shape[0]  # out features (lmtrain stores [out, in]) or the norm's width
                yield prefix + where.names[0].removesuffix(".weight") + ".bias", torch.zeros(width, dtype=tensor.dtype)


def _shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _token(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    return tokenizer.id_to_token(token_id) if token_id is not None else None


def write_hf(
    model: TransformerLM,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    side_files: dict[str, str],
    folder: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 1024**3,
) -> int:
    """Write `model` into `folder` (which must be empty or new); returns the bytes of weights written.
    Raises UserError when no supported family can express the model (see `family_of`)."""
    family = family_of(model.config)
    tensors = [(name, t.detach().to("cpu", dtype)) for name, t in hf_state(model, family)]
    shards = _shards(tensors, max_shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    eos = special.stop if len(special.stop) > 1 else special.end_of_text
    ids = {"bos": special.bos, "eos": eos, "pad": None}
    config = config_to_hf(model.config, family, ids)
    config["torch_dtype"] = HF_NAMES[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    tokenizer_config = json.loads(side_files.get("tokenizer_config.json", "{}"))
    tokenizer_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tokenizer_config.setdefault("eos_token", _token(tokenizer, special.end_of_text))
    tokenizer_config.setdefault("model_max_length", model.config.max_seq_len)
    if special.bos is not None:
        tokenizer_config.setdefault("bos_token", _token(tokenizer, special.bos))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation = json.loads(side_files.get("generation_config.json", "{}"))
    generation.setdefault("eos_token_id", eos)
    if special.bos is not None:
        generation.setdefault("bos_token_id", special.bos)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if "chat_template.jinja" in side_files:
        (folder / "chat_template.jinja").write_text(side_files["chat_template.jinja"])
    return sum(t.numel() * t.element_size() for _, t in tensors)


def write_peft(model: TransformerLM, record: dict, folder: Path) -> int:
    """A LoRA-wrapped `model`'s adapters in PEFT's layout (adapter_config.json, adapter_model.safetensors),
    named for the Hugging Face model of its family; `record` is the run's adapter.json. A fused q/k/v adapter
    becomes three that share A (B split by rows), which computes the same update. Returns bytes written."""
    from lmtrain.model.lora import LoRALinear

    family = family_of(model.config)
    prefix = family.prefix
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        where = family.source(f"{name}.weight")
        modules = [prefix + n.removesuffix(".weight") for n in where.names]
        parts = module.lora_B.split(split_sizes(model.config), dim=0) if len(modules) > 1 else (module.lora_B,)
        for hf_module, part in zip(modules, parts, strict=True):
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = module.lora_A.detach().cpu().clone()
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = part.detach().contiguous().cpu()
            targets.append(hf_module)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": record["base"],
        "r": record["rank"],
        "lora_alpha": record["alpha"],
        "lora_dropout": record["dropout"],
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": family.transposed,  # GPT-2's Conv1D stores its weight [in, out]
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())
