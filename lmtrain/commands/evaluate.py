"""`lmtrain evaluate`: score any checkpoint (pretrained or finetuned) on a split, or on a benchmark suite
(`suite=<task or group YAML>`); writes `eval.json` (and, for a suite, `samples.jsonl`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.config import EvaluateConfig
from lmtrain.core.distributed import resolve_device
from lmtrain.tasks.base import load_task_info
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.records import split_examples
from lmtrain.tasks.registry import task_for

log = logging.getLogger("lmtrain")


def run(cfg: EvaluateConfig, run_dir: str) -> None:
    device = resolve_device(cfg.device, "device")
    assert cfg.ckpt is not None, "ckpt is checked before the run"
    if cfg.suite.path is not None:
        return run_suite(cfg, device, Path(run_dir))
    model, tokenizer = load_model(cfg.ckpt, device)
    source = checkpoint.resolve(cfg.ckpt)
    trained: dict[str, Any] = (  # a run's config.yaml is a mapping (OmegaConf types it as any container)
        cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(source / "config.yaml")))
        if (source / "config.yaml").is_file()
        else {}
    )
    info = load_task_info(cfg.ckpt) or LanguageModelling.plain_info()  # a pretrained LM: perplexity on text
    for role in info.fields:
        override = getattr(cfg.data, f"{role}_field")
        if override is not None:
            info.fields[role] = override
    for key in ("decoding", "num_beams", "max_new_tokens"):
        if getattr(cfg, key) is not None:
            info.decoding[key] = getattr(cfg, key)
    task = task_for(info, tokenizer, model.config.max_seq_len, load_special_tokens(cfg.ckpt, tokenizer))
    examples, path, skipped = split_examples(
        trained, task, cfg.split, getattr(cfg.data, cfg.split), cfg.data.on_bad_record
    )
    examples = examples[: cfg.max_examples]
    result = task.evaluate(model, examples, batch_size=cfg.batch_size, device=device, seed=cfg.seed)
    report = {
        "task": info.name,
        "split": cfg.split,
        "num_examples": len(examples),
        "skipped_records": skipped,
        "data": str(path),
        "checkpoint": str(source),
        **result,
    }
    out = Path(run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key != "per_class":
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"{'eval.json':<{width}}  {out}")


def run_suite(cfg: EvaluateConfig, device: torch.device, run_dir: Path) -> None:
    """Score the suite's tasks (docs/benchmarks.md); print a table; write eval.json and samples.jsonl."""
    from tqdm import tqdm

    from lmtrain.evals.scorer import Scorer
    from lmtrain.evals.suite import load_suite, report, score_suite, table, write_samples

    assert cfg.ckpt is not None and cfg.suite.path is not None
    _, specs = load_suite(cfg.suite.path, "suite.path")
    model, tokenizer = load_model(cfg.ckpt, device)
    special = load_special_tokens(cfg.ckpt, tokenizer)
    scorer = Scorer(model, tokenizer, special, device, cfg.suite.precision, cfg.suite.batch_size)
    with tqdm(unit="doc", disable=None, leave=False) as bar:
        results = score_suite(specs, scorer, cfg.suite.limit, cfg.suite.num_fewshot, bar)
    scores = report(results)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
    write_samples(results, run_dir / "samples.jsonl")
    print(table(scores))
    print(f"eval.json  {run_dir / 'eval.json'}")
