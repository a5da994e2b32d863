"""`lmtrain pretrain`: tokens → model → optimizer → Trainer → metrics and checkpoints in the run dir."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmtrain import distributed, runs
from lmtrain.config import PretrainConfig, accumulation_steps
from lmtrain.data import tokens
from lmtrain.metrics import perplexity
from lmtrain.model import TransformerConfig, TransformerLM

log = logging.getLogger("lmtrain")
HINT = 'lmtrain generate ckpt=%s prompt="def "'  # printed at the end of a run; a test runs it as printed


def run(cfg: PretrainConfig, run_dir: str) -> dict:
    """Train; returns the run's summary, whose `objective` (best validation loss) Hydra sweepers minimise."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    runs.prepare_run_dir(run_dir)
    t, m, d = cfg.trainer, cfg.model, cfg.data
    placement = distributed.place(t.strategy, t.device, t.dist_timeout_s)
    device, main = placement.device, placement.is_main
    source = runs.resume_source(t.resume, run_dir)

    with distributed.main_first():  # one process tokenizes; the others read its cache
        data = tokens.prepare(**dataclasses.asdict(d))
    tokenizer_json = data.tokenizer.to_str()
    if main:
        (run_dir / "tokenizer.json").write_text(tokenizer_json)
    log.info(
        "data: %s train / %s validation tokens, vocabulary %d (cache %s)",
        f"{len(data.train):,}",
        f"{len(data.validation):,}",
        data.tokenizer.get_vocab_size(),
        data.cache_path,
    )

    torch.manual_seed(t.seed)
    model_config = TransformerConfig(vocab_size=data.tokenizer.get_vocab_size(), **dataclasses.asdict(m))
    model = TransformerLM(model_config).to(device)
    log.info(
        "model: %s parameters, %.2f MFLOPs per token (training)",
        f"{model.num_parameters():,}",
        model.flops_per_token() / 1e6,
    )
    accum_steps = accumulation_steps(cfg.grad_accum, t.micro_batch_size, m.max_seq_len, placement.world_size)
    trainer = runs.build_trainer(model, cfg, placement, t.max_steps, tokenizer_json=tokenizer_json)
    sampler = tokens.WindowSampler(data.train, m.max_seq_len, t.seed)
    validation = tokens.validation_batches(data.validation, m.max_seq_len, t.eval_batches, t.micro_batch_size)

    files = {
        "config.yaml": OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        "model.json": json.dumps(dataclasses.asdict(model_config), indent=2),
        "tokenizer.json": tokenizer_json,
    }

    def evaluate() -> dict[str, float]:
        loss = trainer.evaluate_loss(validation)
        return {"loss": loss, "ppl": perplexity(loss)}

    summary = runs.train(
        trainer,
        sampler,
        lambda: sampler.next_step(accum_steps, t.micro_batch_size, placement.rank, placement.world_size),
        evaluate,
        run_dir=run_dir,
        files=files,
        source=source,
        settings=t,
        max_steps=t.max_steps,
        eval_every=t.eval_every,
        started=started,
        data_counts={f"skipped_{k.split('.')[1]}_records": n for k, n in data.skipped.items()},
    )
    log.info("try: " + HINT, run_dir / "checkpoints" / "latest")
    return summary
