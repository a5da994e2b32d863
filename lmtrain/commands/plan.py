"""`lmtrain plan [pretrain|finetune] [--measure] [--format text|json] [--device NAME] [overrides]`: what a run
will cost before it runs (parameters, FLOPs, tokens, memory, time), from the config pretrain or finetune would
compose with the same overrides. Nothing is trained; `--measure` times a few real steps on random tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.analysis import costs
from lmtrain.core.errors import UserError

if TYPE_CHECKING:
    from lmtrain.train.trainer import Batch

PLAN_COMMANDS = ("pretrain", "finetune")


def _parser() -> argparse.ArgumentParser:
    """The command line of `lmtrain plan`."""
    parser = argparse.ArgumentParser(
        prog="lmtrain plan",
        description="Parameters, FLOPs, tokens, memory and time of a pretrain (default) or finetune run, "
        "without training. Takes the same overrides as that command, e.g. "
        "lmtrain plan model=gpt2_124m trainer=gpu trainer.micro_batch_size=16 grad_accum.steps=8; "
        "lmtrain plan finetune init_from=outputs/<run>/checkpoints/latest data.train=train.jsonl",
    )
    parser.add_argument("overrides", nargs="*", help="[pretrain|finetune] then key=value overrides")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument(
        "--device",
        help="plan for this device instead of trainer.device: cpu or a GPU of the table "
        "(h200, h100, a100, a100-40gb, l40s, l4, a10, 4090, 3090, v100, t4, mi300x, mi250x)",
    )
    parser.add_argument("--measure", action="store_true", help="also run a few real steps and report what they took")
    parser.add_argument("--steps", type=int, default=3, help="steps --measure runs (the first is a warm-up)")
    return parser


def main(argv: list[str], check: Callable[[str, type, list[str]], Any]) -> int:
    """`check` composes and validates a config as the CLI does for pretrain/finetune (lmtrain.cli.check)."""
    args = _parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    command = overrides.pop(0) if overrides and overrides[0] in PLAN_COMMANDS else "pretrain"
    try:
        if args.steps < 2:
            raise UserError(f"--steps: must be >= 2 (one warm-up and one timed step), got {args.steps}")
        from lmtrain.config import FinetuneConfig, PretrainConfig

        cfg = check(command, PretrainConfig if command == "pretrain" else FinetuneConfig, overrides)
        plan = build(command, cfg, args.device)
        if args.measure:
            plan["measured"] = measure(plan, cfg, args.steps)
    except UserError as err:
        for line in str(err).splitlines():
            print(f"lmtrain plan: error: {line}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.format == "json" else costs.render(plan))
    return 0


# ---- the model and its data ---------------------------------------------------------------------------------
def _pretrain_model(cfg) -> tuple[Any, str]:
    """The model pretrain would build (on the meta device: shapes only) and where its vocabulary size came from."""
    from lmtrain.data import tokens

    d = cfg.data
    if cfg.init_from:  # continued pretraining: that model's shape
        from lmtrain.checkpoint.load import model_config

        return _meta_model(**dataclasses.asdict(model_config(cfg.init_from, "init_from"))), f"init_from={cfg.init_from}"
    cached = tokens.cached_tokenizer(**tokens.corpus_settings(d))
    if cached is not None:
        vocab, source = cached.get_vocab_size(), "the tokenizer cached for data.train"
    elif d.tokenizer == "byte":
        vocab, source = 257, "byte tokenizer"
    elif d.tokenizer == "bpe":
        vocab, source = d.vocab_size, "data.vocab_size (the BPE is not trained yet: at most this)"
    else:  # char: cheap to build exactly, and pretrain reuses the cache
        vocab, source = tokens.prepare(**tokens.corpus_settings(d)).tokenizer.get_vocab_size(), "the char tokenizer"
    return _meta_model(vocab_size=vocab, **dataclasses.asdict(cfg.model)), source


def _meta_model(**config):
    """A TransformerLM of this config on the meta device: shapes, no memory."""
    import torch

    from lmtrain.model.transformer import TransformerConfig, TransformerLM

    with torch.device("meta"):
        return TransformerLM(TransformerConfig(**config))


def _finetune_model(cfg) -> tuple[Any, list[int]]:
    """The model finetune would train (init_from's shape, the task's head, frozen parts, adapters) and the
    lengths of its training examples in tokens. init_from may be any checkpoint or a Hugging Face folder."""
    from lmtrain.checkpoint.load import load_special_tokens, load_tokenizer, model_config
    from lmtrain.data.examples import read_records, split_off
    from lmtrain.model.lora import add_lora
    from lmtrain.tasks.records import data_fields
    from lmtrain.tasks.registry import build_task_info, task_class, task_for

    config = dataclasses.asdict(model_config(cfg.init_from, "init_from"))
    tokenizer = load_tokenizer(cfg.init_from, "init_from")
    fields = data_fields(cfg.data)
    records = read_records(cfg.data.train, "data.train", txt_by=task_class(cfg.task.name).text_unit)
    info = build_task_info(cfg.task, fields, records)
    special = load_special_tokens(cfg.init_from, tokenizer, "init_from")
    task = task_for(info, tokenizer, config["max_seq_len"], special)
    examples = task.encode(records, "data.train", cfg.data.train)
    if not cfg.data.validation:  # finetune trains on what it does not hold out for validation
        examples = split_off(examples, cfg.data.val_fraction, cfg.trainer.seed)[0]
    lengths = [task.input_length(e) for e in examples]
    model = _meta_model(**{**config, "num_classes": task.num_classes})
    if task.num_classes and not model.config.tie_embeddings:
        model.lm_head.requires_grad_(False)  # as finetune does: the LM head is unused by class logits
    model.freeze(embeddings=cfg.freeze_embeddings, first_blocks=cfg.freeze_blocks)
    if cfg.adapter.name == "lora":  # as finetune does: a frozen base, adapters and a fresh head train
        a = cfg.adapter
        add_lora(model, list(a.target_modules), a.rank, a.alpha, a.dropout)
        if model.classifier is not None:
            model.classifier.requires_grad_(True)
    return model, lengths


@dataclasses.dataclass
class _Workload:
    """What a run trains and how many tokens it feeds it: the model (meta device) and its batch shape."""

    model: Any
    vocab_source: str  # where the vocabulary size came from
    longest: int  # the longest micro-batch's length, which sets the memory peak
    mean_len: float  # the mean tokens per sequence (pretraining: the context; finetuning: the mean example)
    attention_len: int  # the sequence length a token attends over, on average over tokens
    accumulation: int
    max_steps: int
    references: int = 0  # frozen model copies beside it (a preference run's reference)


def _pretrain_workload(cfg, world: int, device_name: str | None) -> _Workload:
    """The model and batches pretrain would train: full windows of the context length."""
    from lmtrain.config import accumulation_steps

    model, vocab_source = _pretrain_model(cfg)
    seq_len = cfg.model.max_seq_len
    t = cfg.trainer
    if t.micro_batch_size == "auto":  # as pretrain chooses it, against the planned device's memory
        memory = costs.device_for(device_name or t.device, t.precision).memory_bytes
        tokens = cfg.grad_accum.global_batch_tokens or 0
        t.micro_batch_size = costs.fitting_micro_batch(model, seq_len, cfg, memory, tokens, world)
    accumulation = accumulation_steps(cfg.grad_accum, t.micro_batch_size, seq_len, world)
    return _Workload(model, vocab_source, seq_len, seq_len, seq_len, accumulation, t.max_steps)


def _finetune_workload(cfg, world: int) -> _Workload:
    """The model and batches finetune would train: its examples (batched by length, so padded little), for
    `epochs` capped by trainer.max_steps when set (nulls derived as finetune does); the frozen models beside it."""
    from lmtrain.tasks import registry
    from lmtrain.train.finetune_defaults import derived

    model, lengths = _finetune_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    resolved, _ = derived(cfg, len(lengths), trainable, world)
    t, accumulation = cfg.trainer, cfg.grad_accum.steps  # filled in place: build() holds cfg.trainer
    t.micro_batch_size, cfg.optimizer.lr = resolved.trainer.micro_batch_size, resolved.optimizer.lr
    cfg.epochs = resolved.epochs
    max_steps = costs.finetune_steps(len(lengths), t.micro_batch_size, accumulation, world, cfg.epochs)
    max_steps = min(max_steps, t.max_steps or max_steps)
    attention_len = round(sum(n * n for n in lengths) / sum(lengths))  # a token of an n-token example attends n
    mean_len = sum(lengths) / len(lengths)
    references = registry.task_class(cfg.task.name).reference_models(cfg)
    return _Workload(model, "init_from", max(lengths), mean_len, attention_len, accumulation, max_steps, references)


# ---- the plan --------------------------------------------------------------------------------------------------
def build(command: str, cfg, device_name: str | None) -> dict:
    """Every number of the plan, as a JSON-able dict."""
    t = cfg.trainer
    world = max(t.nproc, 1)
    strategy = t.strategy if t.strategy not in ("auto", "single") else ("ddp" if world > 1 else "single")
    work = _pretrain_workload(cfg, world, device_name) if command == "pretrain" else _finetune_workload(cfg, world)
    c = work.model.config
    parameters = _parameter_counts(work.model)
    flops_per_token = work.model.flops_per_token(work.attention_len)
    tokens = costs.token_counts(
        t.micro_batch_size, work.mean_len, work.longest, work.accumulation, world, work.max_steps
    )
    tokens_per_step = tokens["per_step"]
    memory = _memory(cfg, work, parameters, strategy, world)
    device = costs.device_for(device_name or t.device, t.precision)
    return {
        "command": command,
        "model": {
            **{name: getattr(c, name) for name in ("d_model", "num_heads", "num_layers", "max_seq_len", "vocab_size")},
            "vocab_source": work.vocab_source,
            "num_classes": c.num_classes,
        },
        "parameters": parameters,
        "flops": {
            "per_token": flops_per_token,
            "attention_len": work.attention_len,
            "per_step": flops_per_token * tokens_per_step,
            "per_run": flops_per_token * tokens_per_step * work.max_steps,
        },
        "tokens": tokens,
        "memory": {
            **memory,
            "precision": t.precision,
            "optimizer_name": cfg.optimizer.name,
            "strategy": strategy,
            "activation_checkpointing": t.activation_checkpointing,
            **costs.fit(memory, t.micro_batch_size, device.memory_bytes),
        },
        "time": costs.time_estimate(
            device,
            t.precision,
            flops_per_step=flops_per_token * tokens_per_step,
            tokens_per_step=tokens_per_step,
            max_steps=work.max_steps,
            world_size=world,
            checkpointing=t.activation_checkpointing,
        ),
    }


def _parameter_counts(model) -> dict[str, int]:
    """Total, embedding (token + position tables), non-embedding and trainable parameters (shared ones once)."""
    import torch

    total = model.num_parameters()
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "trainable": trainable}


def _memory(cfg, work: _Workload, parameters: dict[str, int], strategy: str, world: int) -> dict[str, int]:
    """The estimated peak memory per process, by part, of the workload under cfg's trainer and optimizer."""
    import torch

    from lmtrain.train.optim import MEMORY_PER_PARAMETER

    t = cfg.trainer
    memory = costs.memory_estimate(
        costs.ModelShape.of(work.model.config),
        total_params=parameters["total"],
        trainable_params=parameters["trainable"],
        linear_weights=sum(m.weight.numel() for m in work.model.modules() if isinstance(m, torch.nn.Linear)),
        micro_batch=t.micro_batch_size,
        seq_len=work.longest,
        precision=t.precision,
        optimizer_bytes=MEMORY_PER_PARAMETER[cfg.optimizer.name](cfg.optimizer),
        strategy=strategy,
        world_size=world,
        checkpointing=t.activation_checkpointing,
    )
    return costs.with_references(memory, parameters["total"], work.references)


# ---- measuring -------------------------------------------------------------------------------------------------
def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _memory_in_use(device) -> int:
    """Bytes in use on `device` now (CUDA: allocated by torch; CPU: the process's RSS), after freeing what can
    be freed and resetting the peak that `measure` reads."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _warm_up()
    gc.collect()
    with contextlib.suppress(OSError):  # reset VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    return _rss("VmRSS")


def measure(plan: dict, cfg, steps: int) -> dict:
    """Run `steps` optimizer steps of the planned config on random tokens; report the timed steps (all but the
    first) and the peak memory: on CUDA torch's peak allocation, on CPU the growth of the process's peak RSS
    (VmHWM, reset before the model is built) over its RSS at that moment."""
    import torch

    from lmtrain.core import devices, distributed
    from lmtrain.model.transformer import TransformerConfig, TransformerLM
    from lmtrain.train import build as runs

    if plan["tokens"]["processes"] > 1:
        raise UserError("--measure runs one process; plan trainer.nproc > 1 without it (or run torchrun yourself)")
    t = cfg.trainer
    placement = distributed.place("single", t.device, t.dist_timeout_s)
    device = placement.device
    m = plan["model"]
    config = plan_config(cfg, m)
    cuda = device.type == "cuda"
    if not cuda and not Path("/proc/self/status").is_file():
        raise UserError("--measure: measuring CPU memory needs Linux's /proc; plan without --measure")
    before = _memory_in_use(device)
    torch.manual_seed(t.seed)
    model = TransformerLM(TransformerConfig(**config)).to(device)
    if cfg.__class__.__name__ == "FinetuneConfig":
        if config["num_classes"] and not model.config.tie_embeddings:
            model.lm_head.requires_grad_(False)
        model.freeze(embeddings=cfg.freeze_embeddings, first_blocks=cfg.freeze_blocks)
    trainer = runs.build_trainer(model, cfg, placement, max(steps, cfg.scheduler.warmup_steps + 1), tokenizer_json="")
    batches = _random_step(plan, config, device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        _, grad_norm = trainer.train_step(batches)
        grad_norm.item()  # waits for the device
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _rss("VmHWM")) - before
    step_seconds = sum(seconds[1:]) / len(seconds[1:])
    tokens = plan["tokens"]["per_step"]
    return {
        "steps": steps,
        "step_seconds": step_seconds,
        "tokens_per_s": tokens / step_seconds,
        "mfu": devices.mfu(plan["flops"]["per_step"] / step_seconds, plan["time"]["peak_flops"], device, t.precision),
        "peak_memory": peak,
        "memory_source": "torch.cuda.max_memory_allocated" if cuda else "growth of peak RSS (VmHWM)",
    }


def plan_config(cfg, model: dict) -> dict:
    """The TransformerConfig fields of the planned model."""
    from lmtrain.checkpoint.load import model_config

    if cfg.__class__.__name__ == "PretrainConfig" and not cfg.init_from:
        return {"vocab_size": model["vocab_size"], **dataclasses.asdict(cfg.model)}
    config = dataclasses.asdict(model_config(cfg.init_from, "init_from"))
    return {**config, "num_classes": model.get("num_classes", 0)}


def _warm_up() -> None:
    """One tiny training step first, so the libraries' lazily built kernels and thread pools are not counted;
    then the memory freed so far (the CPU peak's matmuls, say) goes back to the system, so the run's own
    allocations grow the RSS instead of reusing it unseen."""
    import ctypes

    import torch

    from lmtrain.model.transformer import TransformerConfig, TransformerLM

    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=16, num_heads=2, num_layers=1, max_seq_len=8))
    tokens = torch.randint(11, (2, 8))
    model(tokens).sum().backward()
    torch.optim.AdamW(model.parameters()).step()
    del model, tokens
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the estimate may then read low
        pass


def _random_step(plan: dict, config: dict, device) -> list:
    """One optimizer step of micro-batches of random tokens, shaped as the planned run's largest."""
    import torch

    tok = plan["tokens"]
    batch, seq = tok["micro_batch_size"], tok["longest"]
    generator = torch.Generator().manual_seed(0)
    step: list[Batch] = []
    for _ in range(tok["accumulation_steps"]):
        windows = torch.randint(config["vocab_size"], (batch, seq + 1), generator=generator)
        if config.get("num_classes"):
            inputs = {"tokens": windows[:, :-1], "last_positions": torch.full((batch,), seq - 1)}
            step.append((inputs, torch.randint(config["num_classes"], (batch,), generator=generator)))
        else:
            step.append((windows[:, :-1], windows[:, 1:]))
    return step
