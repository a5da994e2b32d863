"""`lmtrain predict`: labels with probabilities from a classification checkpoint, for a line or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.config import PredictConfig
from lmtrain.core.distributed import resolve_device
from lmtrain.core.errors import UserError
from lmtrain.data.examples import fixed_batches, read_records, usable_records
from lmtrain.tasks.base import load_task_info
from lmtrain.tasks.registry import task_class, task_for


@torch.no_grad()
def run(cfg: PredictConfig, run_dir: str) -> None:
    device = resolve_device(cfg.device, "device")
    assert cfg.ckpt is not None, "ckpt is checked before the run"
    info = load_task_info(cfg.ckpt)
    if info is None or not task_class(info.name).classifies:
        raise UserError("ckpt: predict needs a checkpoint finetuned with task=classification")
    assert info.labels is not None, "a classification checkpoint's task.json lists its labels"
    model, tokenizer = load_model(cfg.ckpt, device)
    field = cfg.text_field or info.fields["text"]
    if cfg.text is not None:
        texts = [cfg.text]
    else:
        assert cfg.input is not None, "config.checks requires text or input"
        field = "text" if Path(cfg.input).suffix in (".txt", ".md") else field
        records = read_records(cfg.input, "input", [field])
        texts = [r[field] for r in usable_records(records, {field: (str,)}, "input", cfg.input, cfg.on_bad_record)[0]]
    task = task_for(info, tokenizer, model.config.max_seq_len, load_special_tokens(cfg.ckpt, tokenizer))
    examples, _ = task.encode_texts(texts, "text" if cfg.text is not None else "input")
    for i, example in enumerate(examples):
        example.label = i  # carries the position through the length-sorted batches
    results: list[dict] = [{} for _ in texts]
    model.eval()
    for inputs, positions in fixed_batches(examples, cfg.batch_size, task.collate):
        probs = model(**{k: v.to(device) for k, v in inputs.items()}).float().softmax(-1).cpu()
        for position, row in zip(positions.tolist(), probs.tolist(), strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            results[position] = {
                "text": texts[position],
                "label": info.labels[best],
                "probabilities": {str(label): p for label, p in zip(info.labels, row, strict=True)},
            }
    if cfg.output:
        Path(cfg.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
    out = open(Path(cfg.output).expanduser(), "w") if cfg.output else sys.stdout
    try:
        for result in results:
            out.write(json.dumps(result) + "\n")
    finally:
        if cfg.output:
            out.close()
