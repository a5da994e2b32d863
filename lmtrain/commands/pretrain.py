"""`lmtrain pretrain`: tokens → model → optimizer → Trainer → metrics and checkpoints in the run dir."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from lmtrain.analysis import costs
from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.checkpoint.resume import resume_source
from lmtrain.config import PretrainConfig, accumulation_steps
from lmtrain.core import devices, distributed
from lmtrain.core.errors import UserError
from lmtrain.core.safe_io import read_text_capped
from lmtrain.data import mixture, streaming, tokens
from lmtrain.data.tokenizer import SpecialTokens, end_of_text_id
from lmtrain.evals.training import main_metric_args, suite_evaluation
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.tasks.metrics import perplexity
from lmtrain.train import build as runs
from lmtrain.train.run_dir import claimed
from lmtrain.train.trainer import Trainer

log = logging.getLogger("lmtrain")
HINT = 'lmtrain generate ckpt=%s prompt="def "'  # printed at the end of a run; a test runs it as printed


def run(cfg: PretrainConfig, run_dir: str) -> dict:
    """Train; returns the run's summary, whose `objective` (best validation loss) Hydra sweepers minimise."""
    with claimed(Path(run_dir)):
        return _run(cfg, Path(run_dir))


def _run(cfg: PretrainConfig, run_dir: Path) -> dict:
    started = time.perf_counter()
    t, d = cfg.trainer, cfg.data
    runs.check_options(cfg)
    max_steps, eval_every = t.max_steps, t.eval_every
    assert max_steps is not None and eval_every is not None, "config.checks requires both for pretrain"
    placement = distributed.place(t.strategy, t.device, t.dist_timeout_s, t.dist_join_timeout_s)
    source = resume_source(t.resume, run_dir)
    pretrained, existing, special = _init_from(cfg, placement.device)
    end_of_text = special.end_of_text if special is not None else None
    tokenizer, sources = _tokens(cfg, existing, end_of_text)
    model, seq_len = _model(cfg, pretrained, tokenizer, placement.device)
    auto = t.micro_batch_size == "auto"
    if auto:
        t.micro_batch_size = _auto_micro_batch(cfg, model, seq_len, placement, source)
    accum_steps = accumulation_steps(cfg.grad_accum, t.micro_batch_size, seq_len, placement.world_size)
    tokenizer_json = tokenizer.to_str()
    trainer = runs.build_trainer(model, cfg, placement, max_steps, tokenizer_json=tokenizer_json)
    trainer.retry_out_of_memory = auto and placement.world_size == 1
    eos = end_of_text if end_of_text is not None else end_of_text_id(tokenizer)
    sampler, validation = _windows(cfg, sources, tokenizer, eos, seq_len)
    separator = eos if d.document_masking else None
    special = special or SpecialTokens(end_of_text=eos, stop=[eos])
    suite = suite_evaluation(t, model, tokenizer, special, placement.device, lambda: trainer.state.step, max_steps)
    next_step = _stepper(sampler, accum_steps, t.micro_batch_size, placement, separator)
    evaluate = _evaluation(trainer, validation, sources, bool(d.sources), suite)
    files = runs.run_files(cfg, model, tokenizer_json)
    skipped = {f"skipped_{k.split('.')[1]}_records": n for s in sources for k, n in s.data.skipped.items()}
    summary = runs.train(
        trainer,
        sampler,
        next_step,
        evaluate,
        run_dir=run_dir,
        files=files,
        source=source,
        settings=t,
        max_steps=max_steps,
        eval_every=eval_every,
        started=started,
        data_counts=skipped,
        accounting=sampler.accounting,
        **main_metric_args(t, "loss", higher_is_better=False, keep_best=False),
    )
    split = trainer.state.micro_batch_split
    summary.update(micro_batch_size=t.micro_batch_size // split, accumulation_steps=accum_steps * split)
    log.info("try: " + HINT, run_dir / "checkpoints" / "latest")
    return summary


def _stepper(sampler, accum_steps: int, micro_batch_size: int, placement, separator: int | None):
    """The source of each step's micro-batches of windows, marked at document ends (data.document_masking)."""

    def next_step() -> list:
        windows = sampler.next_step(accum_steps, micro_batch_size, placement.rank, placement.world_size)
        return windows if separator is None else [tokens.with_documents(batch, separator) for batch in windows]

    return next_step


def _init_from(
    cfg: PretrainConfig, device: torch.device
) -> tuple[TransformerLM | None, Tokenizer | None, SpecialTokens | None]:
    """Continued pretraining (init_from): the model with its own shape and weights, its tokenizer and its special
    tokens; Nones for a new model."""
    if not cfg.init_from:
        return None, None, None
    pretrained, existing = load_model(cfg.init_from, device, key="init_from")
    return pretrained, existing, load_special_tokens(cfg.init_from, existing, key="init_from")


def _evaluation(
    trainer: Trainer,
    validation: dict[str, list],
    sources: list[mixture.Source],
    mixed: bool,
    suite: Callable[[], dict[str, float]],
) -> Callable[[], dict[str, float]]:
    """The run's evaluation: validation loss (of a mixture: weighted over its sources, each also reported when
    `mixed`), its perplexity, and the benchmark suite's scores when they are due."""

    def evaluate() -> dict[str, float]:
        losses = {name: trainer.evaluate_loss(batches) for name, batches in validation.items()}
        loss = mixture.weighted_loss(losses, sources) if sources else losses[""]
        per_source = {f"{name}_loss": value for name, value in losses.items()} if mixed else {}
        return {"loss": loss, "ppl": perplexity(loss), **per_source, **suite()}

    return evaluate


def _auto_micro_batch(
    cfg: PretrainConfig, model: TransformerLM, seq_len: int, placement: distributed.Placement, source: Path | None
) -> int:
    """trainer.micro_batch_size=auto: the micro-batch the run chose before (a resume), else the largest power of
    two that `lmtrain plan`'s memory estimate fits in the device's free memory (on CUDA, a step that still runs
    out of memory is retried in halves: lmtrain.train.micro_batch)."""
    if source is not None:
        chosen = OmegaConf.create(
            read_text_capped(source / "config.yaml", 1 << 20, "trainer.resume")
        ).trainer.micro_batch_size
        log.info("trainer.micro_batch_size=auto: %s, as chosen when the run started", chosen)
        return int(chosen)
    device = placement.device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else devices.cpu_memory_bytes()
    tokens_per_step = cfg.grad_accum.global_batch_tokens or 0
    size = costs.fitting_micro_batch(model, seq_len, cfg, free, tokens_per_step, placement.world_size)
    log.info(
        "trainer.micro_batch_size=auto: %d (the largest the memory estimate fits in %.1f GB free)", size, free / 1e9
    )
    return size


def _tokens(
    cfg: PretrainConfig, existing: Tokenizer | None, end_of_text: int | None
) -> tuple[Tokenizer, list[mixture.Source]]:
    """The tokenizer and the prepared sources (one, a mixture's several, or none when streaming): one process
    tokenizes, the others then read its cache."""
    d = cfg.data
    with distributed.main_first():
        if d.streaming:
            return streaming.tokenizer(tokens.corpus_settings(d), existing), []
        if d.sources:
            sources = mixture.prepare(d.sources, tokens.corpus_settings(d), existing, end_of_text)
        else:
            data = tokens.prepare(**tokens.corpus_settings(d), existing=existing, end_of_text=end_of_text)
            sources = [mixture.Source("", 1.0, data)]
    for part in sources:
        log.info(
            "data%s: %s train / %s validation tokens, vocab %d (%s)",
            f" {part.name} (weight {part.weight:.3g})" if d.sources else "",
            f"{len(part.data.train):,}",
            f"{len(part.data.validation):,}",
            part.data.tokenizer.get_vocab_size(),
            part.data.cache_path,
        )
    return sources[0].data.tokenizer, sources


def _model(
    cfg: PretrainConfig, pretrained: TransformerLM | None, tokenizer: Tokenizer, device: torch.device
) -> tuple[TransformerLM, int]:
    """The model (init_from's, or a new one of the model group's shape) and the training window."""
    torch.manual_seed(cfg.trainer.seed)
    if pretrained is not None:
        model = pretrained
        log.info("model: from %s (the model group is not used)", cfg.init_from)
    else:
        model_config = TransformerConfig(vocab_size=tokenizer.get_vocab_size(), **dataclasses.asdict(cfg.model))
        model = TransformerLM(model_config).to(device)
    seq_len = cfg.data.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise UserError(f"data.seq_len: {seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    log.info(
        "model: %s parameters, %.2f MFLOPs per token (training)",
        f"{model.num_parameters():,}",
        model.flops_per_token(seq_len) / 1e6,
    )
    return model, seq_len


def _windows(
    cfg: PretrainConfig, sources: list[mixture.Source], tokenizer: Tokenizer, eos: int, seq_len: int
) -> tuple[streaming.StreamSampler | tokens.WindowSampler | mixture.MixtureSampler, dict[str, list]]:
    """The training sampler and the fixed validation batches of each source ("" for a single corpus)."""
    t, d = cfg.trainer, cfg.data
    validation: dict[str, list]
    if d.streaming:
        windows = t.eval_batches * t.micro_batch_size
        stream, held_out = streaming.open_stream(tokens.corpus_settings(d), tokenizer, eos, seq_len, windows)
        sampler: streaming.StreamSampler | tokens.WindowSampler | mixture.MixtureSampler = stream
        validation = {"": tokens.validation_batches(held_out, seq_len, t.eval_batches, t.micro_batch_size)}
    else:
        sampler = _sampler(sources, seq_len, t.seed, d)
        validation = mixture.validation_sets(sources, seq_len, t.eval_batches, t.micro_batch_size)
    if d.document_masking:
        validation = {k: [tokens.with_documents(batch, eos) for batch in v] for k, v in validation.items()}
    return sampler, validation


def _sampler(
    sources: list[mixture.Source], seq_len: int, seed: int, d
) -> tokens.WindowSampler | mixture.MixtureSampler:
    """Random windows of the one corpus, or of a mixture's sources; at document starts with data.window=bos_aligned."""
    samplers = [
        tokens.WindowSampler(
            s.data.train,
            seq_len,
            seed,
            s.data.train_documents if d.window == "bos_aligned" else None,
            key=f"data.sources[{number}].path" if d.sources else "data.train",
        )
        for number, s in enumerate(sources)
    ]
    if not d.sources:
        return samplers[0]
    return mixture.MixtureSampler(samplers, [s.name for s in sources], [s.weight for s in sources], seed)
