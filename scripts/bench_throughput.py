"""Throughput of lmtrain's training loop next to a bare PyTorch loop over the same model and data.

    python scripts/bench_throughput.py [--steps 40] [--repeats 3] [lmtrain pretrain overrides ...]
    python scripts/bench_throughput.py model=small trainer.micro_batch_size=16

Both loops train the same model (same init) on the same packed tokens with AdamW, gradient clipping and
the same LR schedule; the bare loop is what one writes by hand (nanoGPT style: random windows, mean
cross-entropy, backward, clip, step). They alternate `--repeats` times in one process so machine noise
hits both alike; the script prints the median tokens/s of each and their ratio, plus achieved FLOP/s
(and MFU on CUDA, from the device's peak bf16 dense FLOP/s when known).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.cli import check
from lmtrain.config import PretrainConfig
from lmtrain.core.distributed import Placement, resolve_device
from lmtrain.core.dtypes import autocast_dtype
from lmtrain.data import tokens
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train import build as runs
from lmtrain.train.optim import parameter_groups
from lmtrain.train.schedules import lr_at
from lmtrain.train.sinks import Sinks
from lmtrain.train.trainer import Cadence

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per device


def new_model(cfg: PretrainConfig, vocab_size: int, device: torch.device) -> TransformerLM:
    torch.manual_seed(cfg.trainer.seed)
    return TransformerLM(TransformerConfig(vocab_size=vocab_size, **dataclasses.asdict(cfg.model))).to(device)


def bare_loop(cfg, data, vocab_size, device, steps: int, warmup: int) -> float:
    """Tokens/s of a hand-written loop (timed after `warmup` steps)."""
    model = new_model(cfg, vocab_size, device)
    o = cfg.optimizer  # written by hand, as a bare loop would: AdamW, no decay on norms/biases/embeddings
    optimizer = torch.optim.AdamW(
        parameter_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=device.type == "cuda"
    )
    seq, batch = cfg.model.max_seq_len, cfg.trainer.micro_batch_size
    amp = autocast_dtype(cfg.trainer.precision)
    train = data.train
    forward = torch.compile(model) if cfg.trainer.compile else model
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.scheduler, o.lr, warmup + steps)
        ix = torch.randint(len(train) - seq, (batch,))
        x = torch.stack([torch.from_numpy(train[i : i + seq].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1 : i + 1 + seq].astype(np.int64)) for i in ix])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = forward(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return steps * batch * seq / (time.perf_counter() - start)


def lmtrain_loop(cfg, data, vocab_size, device, steps: int, warmup: int) -> float:
    """Tokens/s of lmtrain's Trainer.fit (logging every trainer.log_every steps; no eval or checkpoint)."""
    model = new_model(cfg, vocab_size, device)
    trainer = runs.build_trainer(
        model, cfg, Placement(device=device), warmup + steps, tokenizer_json=data.tokenizer.to_str()
    )
    sampler = tokens.WindowSampler(data.train, cfg.model.max_seq_len, cfg.trainer.seed)

    def run(max_steps: int) -> None:
        trainer.fit(
            lambda: sampler.next_step(1, cfg.trainer.micro_batch_size),
            None,
            cadence=Cadence(max_steps, eval_every=10**9, log_every=cfg.trainer.log_every, checkpoint_every=10**9),
            sink=Sinks([]),
            save_checkpoint=lambda: None,
            progress_bar=False,
        )

    run(max_steps=warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(max_steps=warmup + steps)
    return steps * cfg.trainer.micro_batch_size * cfg.model.max_seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of both loops")
    parser.add_argument("overrides", nargs="*", help="lmtrain pretrain overrides, e.g. model=small")
    args = parser.parse_args()

    cfg = check("pretrain", PretrainConfig, args.overrides)
    device = resolve_device(cfg.trainer.device)
    d = cfg.data
    data = tokens.prepare(**tokens.corpus_settings(d))
    vocab_size = data.tokenizer.get_vocab_size()
    flops_per_token = TransformerLM(TransformerConfig(vocab_size=vocab_size, **dataclasses.asdict(cfg.model)))
    flops_per_token = flops_per_token.flops_per_token()
    print(
        f"device {device} ({torch.get_num_threads()} threads), precision {cfg.trainer.precision}, "
        f"compile {cfg.trainer.compile}; model d_model={cfg.model.d_model} layers={cfg.model.num_layers} "
        f"seq={cfg.model.max_seq_len} batch={cfg.trainer.micro_batch_size} vocab={vocab_size}"
    )
    results = {"bare": [], "lmtrain": []}
    for repeat in range(args.repeats):
        for name, loop in (("bare", bare_loop), ("lmtrain", lmtrain_loop)):
            tokens_per_s = loop(cfg, data, vocab_size, device, args.steps, args.warmup)
            results[name].append(tokens_per_s)
            print(f"  repeat {repeat + 1} {name:8s} {tokens_per_s:12,.0f} tokens/s")
    bare, ours = statistics.median(results["bare"]), statistics.median(results["lmtrain"])
    print(f"median tokens/s: bare {bare:,.0f}   lmtrain {ours:,.0f}   lmtrain/bare {ours / bare:.3f}")
    achieved = ours * flops_per_token
    line = f"achieved {achieved / 1e9:,.1f} GFLOP/s ({flops_per_token / 1e6:.2f} MFLOPs per token)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak:
            line += f", MFU {achieved / peak:.1%} of {name} bf16 peak"
    print(line)


if __name__ == "__main__":
    main()
