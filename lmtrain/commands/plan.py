"""`lmtrain plan [pretrain|finetune] [--measure] [--format text|json] [--device NAME] [overrides]`: what a run
will cost before it runs (parameters, FLOPs, tokens, memory, time), from the config pretrain or finetune would
compose with the same overrides. Nothing is trained; `--measure` times a few real steps on random tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.errors import UserError

if TYPE_CHECKING:
    from lmtrain.trainer import Batch

PLAN_COMMANDS = ("pretrain", "finetune")


def _parser() -> argparse.ArgumentParser:
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
    print(json.dumps(plan, indent=2) if args.format == "json" else render(plan))
    return 0


# ---- the model and its data ---------------------------------------------------------------------------------
def _pretrain_model(cfg) -> tuple[Any, str]:
    """The model pretrain would build (on the meta device: shapes only) and where its vocabulary size came from."""
    from lmtrain.data import tokens

    d = cfg.data
    if cfg.init_from:  # continued pretraining: that model's shape
        from lmtrain.pretrained import model_config

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
    import torch

    from lmtrain.model import TransformerConfig, TransformerLM

    with torch.device("meta"):
        return TransformerLM(TransformerConfig(**config))


def _finetune_model(cfg) -> tuple[Any, list[int]]:
    """The model finetune would train (init_from's shape, the task's head, frozen parts, adapters) and the
    lengths of its training examples in tokens. init_from may be any checkpoint or a Hugging Face folder."""
    import dataclasses

    from lmtrain.data.examples import read_records
    from lmtrain.lora import add_lora
    from lmtrain.pretrained import load_special_tokens, load_tokenizer, model_config
    from lmtrain.task_data import data_fields
    from lmtrain.tasks import build_task_info, task_for, text_unit

    config = dataclasses.asdict(model_config(cfg.init_from, "init_from"))
    tokenizer = load_tokenizer(cfg.init_from, "init_from")
    fields = data_fields(cfg.data)
    records = read_records(cfg.data.train, "data.train", txt_by=text_unit(cfg.task.name))
    info = build_task_info(cfg.task, fields, records)
    special = load_special_tokens(cfg.init_from, tokenizer, "init_from")
    task = task_for(info, tokenizer, config["max_seq_len"], special)
    shift = 0 if task.classify else 1  # a language-model example's last token is only a target
    lengths = [len(e.ids) - shift for e in task.encode(records, "data.train")]
    num_classes = 0
    if task.classify:
        assert info.labels is not None, "build_task_info reads the labels from data.train"
        num_classes = len(info.labels)
    model = _meta_model(**{**config, "num_classes": num_classes})
    if task.classify and not model.config.tie_embeddings:
        model.lm_head.requires_grad_(False)  # as finetune does: the LM head is unused by class logits
    model.freeze(embeddings=cfg.freeze_embeddings, first_blocks=cfg.freeze_blocks)
    if cfg.adapter.name == "lora":  # as finetune does: a frozen base, adapters and a fresh head train
        a = cfg.adapter
        add_lora(model, list(a.target_modules), a.rank, a.alpha, a.dropout)
        if model.classifier is not None:
            model.classifier.requires_grad_(True)
    return model, lengths


# ---- the plan --------------------------------------------------------------------------------------------------
def build(command: str, cfg, device_name: str | None) -> dict:
    """Every number of the plan, as a JSON-able dict."""
    import torch

    from lmtrain import plan as costs
    from lmtrain.config import accumulation_steps

    t = cfg.trainer
    world = max(t.nproc, 1)
    strategy = t.strategy if t.strategy not in ("auto", "single") else ("ddp" if world > 1 else "single")
    if command == "pretrain":
        model, vocab_source = _pretrain_model(cfg)
        seq_len = mean_len = cfg.model.max_seq_len
        accum = accumulation_steps(cfg.grad_accum, t.micro_batch_size, seq_len, world)
        max_steps = t.max_steps
    else:
        model, lengths = _finetune_model(cfg)
        vocab_source = "init_from"
        seq_len = max(lengths)  # the longest micro-batch decides the peak
        mean_len = sum(lengths) / len(lengths)
        accum = cfg.grad_accum.steps
        per_epoch = max(1, math.ceil(len(lengths) / (t.micro_batch_size * accum * world)))
        max_steps = math.ceil(cfg.epochs * per_epoch) if cfg.epochs is not None else t.max_steps
    c = model.config
    total = model.num_parameters()
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops_per_token = model.flops_per_token()
    tokens_per_step = t.micro_batch_size * mean_len * accum * world
    memory = costs.memory_estimate(
        costs.ModelShape.of(c),
        total_params=total,
        trainable_params=trainable,
        linear_weights=linear,
        micro_batch=t.micro_batch_size,
        seq_len=seq_len,
        precision=t.precision,
        optimizer=cfg.optimizer.name,
        momentum=cfg.optimizer.momentum,
        strategy=strategy,
        world_size=world,
        checkpointing=t.activation_checkpointing,
    )
    device = _device(device_name or t.device, t.precision)
    peak = device.peak_flops.get(t.precision)
    if peak is None:
        raise UserError(f"trainer.precision={t.precision}: {device.name} has no {t.precision} peak in the table")
    from lmtrain.devices import ASSUMED_MFU

    mfu = ASSUMED_MFU["cpu" if device.name.startswith("CPU") else "cuda"]
    # activation checkpointing runs each block's forward twice: 8 instead of 6 FLOPs per parameter and token
    hardware = 8 / 6 if t.activation_checkpointing else 1.0
    step_seconds = flops_per_token * tokens_per_step * hardware / (world * peak * mfu)
    fits = memory["total"] <= device.memory_bytes
    return {
        "command": command,
        "model": {
            "d_model": c.d_model,
            "num_heads": c.num_heads,
            "num_layers": c.num_layers,
            "max_seq_len": c.max_seq_len,
            "vocab_size": c.vocab_size,
            "vocab_source": vocab_source,
            "num_classes": c.num_classes,
        },
        "parameters": {
            "total": total,
            "embedding": embedding,
            "non_embedding": total - embedding,
            "trainable": trainable,
        },
        "flops": {
            "per_token": flops_per_token,
            "per_step": flops_per_token * tokens_per_step,
            "per_run": flops_per_token * tokens_per_step * max_steps,
        },
        "tokens": {
            "micro_batch_size": t.micro_batch_size,
            "seq_len": mean_len,  # finetuning: the mean example length
            "longest": seq_len,  # the longest micro-batch's length, which sets the memory peak
            "accumulation_steps": accum,
            "processes": world,
            "per_step": tokens_per_step,
            "per_run": tokens_per_step * max_steps,
            "max_steps": max_steps,
        },
        "memory": {
            **memory,
            "precision": t.precision,
            "optimizer_name": cfg.optimizer.name,
            "strategy": strategy,
            "activation_checkpointing": t.activation_checkpointing,
            "device_bytes": device.memory_bytes,
            "fits": fits,
            "largest_micro_batch": costs.largest_micro_batch(memory, t.micro_batch_size, device.memory_bytes),
        },
        "time": {
            "device": device.name,
            "peak_flops": peak,
            "assumed_mfu": mfu,
            "step_seconds": step_seconds,
            "run_seconds": step_seconds * max_steps,
            "tokens_per_s": tokens_per_step / step_seconds,
        },
    }


def _device(name: str, precision: str):
    from lmtrain import devices

    if name == "cpu":
        return devices.cpu_device(precision)
    import torch

    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            found = devices.cuda_device()
            if found is None:
                raise UserError(
                    f"--device: {torch.cuda.get_device_name()} is not in lmtrain's peak table; "
                    f"pass --device with one of {', '.join(devices.GPUS)}"
                )
            return found
        if name == "auto":
            return devices.cpu_device(precision)
        raise UserError(
            f"trainer.device=cuda but this machine has no CUDA device; plan for one with --device "
            f"({', '.join(devices.GPUS)}) or use trainer.device=cpu"
        )
    found = devices.lookup(name)
    if found is None:
        raise UserError(f"--device: unknown device '{name}'; choose cpu or one of {', '.join(devices.GPUS)}")
    return found


# ---- measuring -------------------------------------------------------------------------------------------------
def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(plan: dict, cfg, steps: int) -> dict:
    """Run `steps` optimizer steps of the planned config on random tokens; report the timed steps (all but the
    first) and the peak memory: on CUDA torch's peak allocation, on CPU the growth of the process's peak RSS
    (VmHWM, reset before the model is built) over its RSS at that moment."""
    import torch

    from lmtrain import distributed, runs
    from lmtrain.model import TransformerConfig, TransformerLM

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
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _warm_up()
        gc.collect()
        _reset_peak_rss()
        before = _rss("VmRSS")
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
        "mfu": plan["flops"]["per_step"] / step_seconds / plan["time"]["peak_flops"],
        "peak_memory": peak,
        "memory_source": "torch.cuda.max_memory_allocated" if cuda else "growth of peak RSS (VmHWM)",
    }


def plan_config(cfg, model: dict) -> dict:
    """The TransformerConfig fields of the planned model."""
    from lmtrain.pretrained import model_config

    if cfg.__class__.__name__ == "PretrainConfig" and not cfg.init_from:
        return {"vocab_size": model["vocab_size"], **dataclasses.asdict(cfg.model)}
    config = dataclasses.asdict(model_config(cfg.init_from, "init_from"))
    return {**config, "num_classes": model.get("num_classes", 0)}


def _warm_up() -> None:
    """One tiny training step first, so the libraries' lazily built kernels and thread pools are not counted."""
    import torch

    from lmtrain.model import TransformerConfig, TransformerLM

    model = TransformerLM(TransformerConfig(vocab_size=11, d_model=16, num_heads=2, num_layers=1, max_seq_len=8))
    tokens = torch.randint(11, (2, 8))
    model(tokens).sum().backward()
    torch.optim.AdamW(model.parameters()).step()


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


# ---- rendering ---------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def _flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or unit == "E":
            return f"{n:.3g} {unit}FLOPs"
        n /= 1000
    return f"{n:.3g} EFLOPs"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(plan: dict) -> str:
    m, p, f, tok, mem, tm = (plan[k] for k in ("model", "parameters", "flops", "tokens", "memory", "time"))
    lines = [
        f"plan for lmtrain {plan['command']}: {m['num_layers']} layers × {m['d_model']} wide, {m['num_heads']} heads, "
        f"context {m['max_seq_len']}, vocabulary {m['vocab_size']:,} ({m['vocab_source']})"
        + (f", {m['num_classes']} classes" if m["num_classes"] else ""),
        "",
        f"parameters   {p['total']:>15,}  total",
        f"             {p['embedding']:>15,}  embedding (token + position tables)",
        f"             {p['non_embedding']:>15,}  non-embedding",
        f"             {p['trainable']:>15,}  trainable",
        f"compute      {_flops(f['per_token']):>15}  per token (training: 6 per matmul parameter + attention)",
        f"             {_flops(f['per_step']):>15}  per step",
        f"             {_flops(f['per_run']):>15}  per run",
        f"tokens       {tok['per_step']:>15,.0f}  per step ({tok['micro_batch_size']} sequences × "
        f"{tok['seq_len']:,.0f} tokens × {tok['accumulation_steps']} micro-batches × {tok['processes']} processes)",
        f"             {tok['per_run']:>15,.0f}  per run ({tok['max_steps']:,} steps)",
        f"memory       per process: {mem['precision']}, {mem['optimizer_name']}, {mem['strategy']}"
        + (", activation checkpointing" if mem["activation_checkpointing"] else ""),
    ]
    for part in ("weights", "gradients", "optimizer", "activations"):
        note = f" (micro-batch {tok['micro_batch_size']})" if part == "activations" else ""
        lines.append(f"             {_size(mem[part]):>15}  {part}{note}")
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(
        f"             {_size(mem['total']):>15}  total: {verdict} in {_size(mem['device_bytes'])} on {tm['device']}"
    )
    if not mem["fits"]:
        best = mem["largest_micro_batch"]
        lines.append(
            f"             largest micro-batch that fits: {best} (raise grad_accum.steps to keep the batch)"
            if best
            else "             even one sequence does not fit: try trainer.activation_checkpointing=true, "
            "trainer.strategy=fsdp with more processes, or a smaller model"
        )
    lines.append(
        f"time         {_duration(tm['step_seconds']):>15}  per step, {_duration(tm['run_seconds'])} per run, "
        f"{tm['tokens_per_s']:,.0f} tokens/s: at {tm['assumed_mfu']:.0%} MFU of {tm['peak_flops'] / 1e12:.3g} "
        f"TFLOP/s {mem['precision']} peak"
    )
    if "measured" in plan:
        ms = plan["measured"]
        error = ms["peak_memory"] / mem["total"] - 1 if mem["total"] else 0.0
        lines += [
            "",
            f"measured     ({ms['steps']} steps on random tokens, the first a warm-up)",
            f"             {_duration(ms['step_seconds']):>15}  per step (estimate {_duration(tm['step_seconds'])})",
            f"             {ms['tokens_per_s']:>15,.0f}  tokens/s, MFU {ms['mfu']:.1%}",
            f"             {_size(ms['peak_memory']):>15}  peak memory (estimate {_size(mem['total'])}, "
            f"measured {error:+.0%}; {ms['memory_source']})",
        ]
    return "\n".join(lines)
