"""`lmtrain export ckpt=<checkpoint> dtype=bf16` (or `quantize=int8`): weights for inference, with the size
on disk and the validation score before and after. `generate`, `evaluate` and `predict` load the export."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.export import EXPORT_MARKER, staged, write_export
from lmtrain.checkpoint.load import load_model, load_side_files, load_special_tokens
from lmtrain.config import DataConfig, ExportConfig
from lmtrain.core.distributed import resolve_device
from lmtrain.core.dtypes import DTYPES
from lmtrain.core.errors import UserError
from lmtrain.core.folder_files import read_folder_text
from lmtrain.core.safe_io import writing
from lmtrain.data import tokens
from lmtrain.hf.families import family_of
from lmtrain.hf.save import write_hf, write_peft
from lmtrain.model.lora import merge_lora
from lmtrain.tasks.base import load_task_info
from lmtrain.tasks.records import split_examples
from lmtrain.train.losses import validation_loss

log = logging.getLogger("lmtrain")
TASK_BATCH = 32  # examples per validation batch of a task checkpoint (a language model's: 16 windows)


@torch.no_grad()
def validation_score(model, tokenizer, source: Path, eval_batches: int, device: torch.device) -> dict | None:
    """Validation loss (and perplexity, or the task's metrics) on `eval_batches` batches of the data the
    checkpoint trained with (a task's first examples); None when the data is gone."""
    config_file = source / "config.yaml"
    if not config_file.is_file():
        return None
    # a run's config.yaml is a mapping (OmegaConf types the result as any container)
    trained = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(config_file), resolve=True))
    model.eval()
    try:
        info = load_task_info(str(source))
        if info is not None:
            from lmtrain.tasks.registry import task_for

            task = task_for(info, tokenizer, model.config.max_seq_len, load_special_tokens(str(source), tokenizer))
            examples = split_examples(trained, task, "validation")[0][: eval_batches * TASK_BATCH]
            result = task.evaluate(model, examples, batch_size=TASK_BATCH, device=device)
            return {k: v for k, v in result.items() if isinstance(v, float)}
        # the run's whole data config (an older run's lacks newer keys: the schema's defaults fill them)
        saved = {k: v for k, v in trained["data"].items() if k in DataConfig.__dataclass_fields__}
        d = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved))
        data = tokens.prepare(**tokens.corpus_settings(d))
        batches = tokens.validation_batches(data.validation, model.config.max_seq_len, eval_batches, 16)
    except Exception as err:  # the training data moved or changed: report size only
        log.warning("no validation score: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    dtype = next(model.parameters()).dtype

    def logits_of(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(batch[0].to(device))

    total, count = validation_loss(batches, logits_of)
    mean = total.item() / count
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0))}


def _write(cfg: ExportConfig, model, tokenizer, source: Path, out: Path, files: dict[str, str], adapter: bool) -> int:
    """Write the export folder in the format asked for; its size in bytes."""
    if adapter and not cfg.merge_adapter:  # the adapters alone, for peft on top of the base model
        with staged(out) as staging:
            size = write_peft(model, json.loads((source / checkpoint.ADAPTER_FILE).read_text()), staging)
            (staging / "tokenizer.json").write_text(tokenizer.to_str())
            meta = {"format": "peft", "dtype": "fp32", "quantize": "none", "int8_layers": [], "bytes": size}
            (staging / EXPORT_MARKER).write_text(json.dumps(meta, indent=2))
    elif cfg.format == "hf":
        special = load_special_tokens(str(source), tokenizer)
        with staged(out) as staging:
            size = write_hf(
                model,
                tokenizer,
                special,
                files,
                staging,
                dtype=DTYPES[cfg.dtype],
                max_shard_bytes=int(cfg.max_shard_mb * 1e6),
            )
            meta = {"format": "hf", "dtype": cfg.dtype, "quantize": "none", "int8_layers": [], "bytes": size}
            (staging / EXPORT_MARKER).write_text(json.dumps(meta, indent=2))
    else:
        size = write_export(model, out, cfg.dtype, cfg.quantize, files)
    return size


def _export_folder(cfg: ExportConfig, source: Path) -> Path:
    """`out`, or `export-<format or dtype>` beside the run's checkpoints; raises UserError when `source` is
    an export itself or the folder holds something other than an export."""
    label = "int8" if cfg.quantize == "int8" else cfg.dtype
    if cfg.format == "hf":
        label = "hf" if cfg.dtype == "fp32" else f"hf-{cfg.dtype}"
    default_out = (source.parent.parent if source.parent.name == "checkpoints" else source.parent) / f"export-{label}"
    out = Path(cfg.out).expanduser() if cfg.out else default_out
    if (source / EXPORT_MARKER).is_file():
        raise UserError(f"ckpt: '{source}' is already an export; export from the training checkpoint")
    if out.exists() and not (out / EXPORT_MARKER).is_file():
        raise UserError(f"out: '{out}' exists and is not an lmtrain export; choose a new folder")
    return out


def _files_to_carry(model, tokenizer, source: Path) -> dict[str, str]:
    """The text files an export holds beside its weights, by name: model.json, the tokenizer, and the
    checkpoint's task.json, config.yaml and side files."""
    # model.json from the model itself: a Hugging Face folder has none
    files = {"model.json": json.dumps(dataclasses.asdict(model.config), indent=2), "tokenizer.json": tokenizer.to_str()}
    carried = [
        name for name in ("task.json", "config.yaml") if (source / name).exists() or (source / name).is_symlink()
    ]
    files.update({name: read_folder_text(source, name, "ckpt") for name in carried})
    files.update(load_side_files(str(source)))
    return files


def run(cfg: ExportConfig, run_dir: str) -> None:
    device = resolve_device(cfg.device, "device")
    assert cfg.ckpt is not None, "ckpt is checked before the run"
    source = checkpoint.resolve(cfg.ckpt)
    model, tokenizer = load_model(str(source), device)
    adapter = (source / checkpoint.ADAPTER_FILE).is_file()
    if cfg.merge_adapter and not adapter:
        raise UserError(f"merge_adapter: '{source}' holds no adapter; drop merge_adapter=true")
    if adapter and not cfg.merge_adapter and cfg.format == "lmtrain":
        raise UserError(
            "merge_adapter: an adapter checkpoint exports merged (merge_adapter=true) or, with format=hf, as a "
            "PEFT adapter"
        )
    if cfg.merge_adapter:
        merge_lora(model)
    if cfg.format == "hf":
        family_of(model.config)  # a model no family can express fails before any work
    out = _export_folder(cfg, source)
    files = _files_to_carry(model, tokenizer, source)
    before = validation_score(model, tokenizer, source, cfg.eval_batches, device) if cfg.score else None
    size = _write(cfg, model, tokenizer, source, out, files, adapter)
    after = None
    if cfg.score and (not adapter or cfg.merge_adapter):  # a PEFT adapter alone is no model to score
        exported, _ = load_model(str(out), device)
        after = validation_score(exported, tokenizer, source, cfg.eval_batches, device)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    report = {
        "export": str(out),
        "format": cfg.format,
        "dtype": cfg.dtype,
        "quantize": cfg.quantize,
        "bytes": size,
        "fp32_bytes": fp32_bytes,
        "validation_before": before,
        "validation_after": after,
    }
    with writing(out / "report.json"):
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"export      {out}")
    print(f"size        {size / 1e6:.2f} MB on disk ({size / fp32_bytes:.0%} of fp32 {fp32_bytes / 1e6:.2f} MB)")
    for name, score in (("before", before), ("after", after)):
        if score:
            print(f"val {name:<7} " + "  ".join(f"{k} {v:.4f}" for k, v in score.items()))
