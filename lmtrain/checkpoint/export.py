"""Inference exports: a checkpoint's weights in fp32/bf16/fp16, or with int8 weight-only quantization of the
linear layers (one scale per output channel). An export folder holds model.safetensors, model.json,
tokenizer.json (and task.json, config.yaml when the checkpoint has them) and export.json, written last."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmtrain.core.dtypes import DTYPES
from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import read_folder_text
from lmtrain.core.safe_io import writing
from lmtrain.model.transformer import TransformerLM

EXPORT_MARKER = "export.json"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], float32 scale [out, 1]) with weight ≈ int8 * scale."""
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return (weight.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored in int8 and dequantized at each call (weight-only)."""

    weight: torch.Tensor  # buffers, registered in __init__
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def _quantizable(model: TransformerLM) -> list[str]:
    """Names of the linear layers to store in int8 (a head tied to the embedding stays as the embedding)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (name == "lm_head" and model.config.tie_embeddings)
    ]


def _swap_in_int8(model: TransformerLM, names: list[str]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, Int8Linear(old.in_features, old.out_features, old.bias is not None))


def _state(model: TransformerLM) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as token_embedding.weight
    return state


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds (an earlier export there is
    replaced only then) and removed when it fails, so `out` never holds half an export."""
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        try:
            with writing(out):
                yield staging
        except UserError as err:  # name the file as it will be, not its staging copy
            raise UserError(str(err).replace(str(staging), str(out))) from err.__cause__
        if out.exists():  # only an earlier export is replaced (checked by the command)
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def clean_staging(out: Path) -> list[Path]:
    """Remove the staging folders (`.<out>.tmp-<pid>-*`) that killed exports of `out` left, those whose process
    is gone (one that lives may still be writing). Returns what was removed."""
    removed = []
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        pid = path.name.removeprefix(f".{out.name}.tmp-").split("-", 1)[0]
        if path.is_dir() and not path.is_symlink() and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_export(model: TransformerLM, out: Path, dtype: str, quantize: str, files: dict[str, str]) -> int:
    """Write the export folder atomically; returns the size of model.safetensors in bytes."""
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in _state(model).items()}
    quantized = _quantizable(model) if quantize == "int8" else []
    for name in quantized:
        state[f"{name}.weight"], scale = quantize_int8(model.get_parameter(f"{name}.weight").detach())
        state[f"{name}.weight_scale"] = scale
    with staged(out) as staging:
        with writing(staging / "model.safetensors"):
            save_file({k: v.cpu() for k, v in state.items()}, str(staging / "model.safetensors"))
        for name, text in files.items():
            with writing(staging / name):
                (staging / name).write_text(text)
        size = (staging / "model.safetensors").stat().st_size
        meta = {"dtype": dtype, "quantize": quantize, "int8_layers": quantized, "bytes": size}
        (staging / EXPORT_MARKER).write_text(json.dumps(meta, indent=2))
    return size


def load_export_weights(model: TransformerLM, folder: Path) -> TransformerLM:
    """Load an export's weights into `model` (built from its model.json), int8 layers included."""
    meta = json.loads(read_folder_text(folder, EXPORT_MARKER, "ckpt"))
    _swap_in_int8(model, meta["int8_layers"])
    state = load_file(str(folder / "model.safetensors"))
    dtype = DTYPES[meta["dtype"]]
    model.to(dtype)
    for module in model.modules():  # int8 scales stay float32 whatever the dtype
        if isinstance(module, Int8Linear):
            module.weight_scale = module.weight_scale.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise ValueError(f"export does not match its model.json: missing {missing}, unexpected {unexpected}")
    return model
