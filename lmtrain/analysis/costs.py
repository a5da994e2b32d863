"""What a training run will cost before it runs: parameters, FLOPs, tokens, memory and time.

Memory is counted per process in bytes: fp32 weights (plus the 16-bit copies autocast keeps for backward),
fp32 gradients, optimizer state, and the activations autograd saves for backward. The activation count
follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4),
redone for this model's modules: SDPA saves its output and log-sum-exp rather than the T×T scores, except
with attention dropout, whose math path does save them. `render` writes a plan (as `lmtrain plan` builds it)
as text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmtrain.core import devices
from lmtrain.core.devices import ASSUMED_MFU, Device
from lmtrain.core.errors import UserError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class ModelShape:
    """What the estimate needs to know of a model (a TransformerConfig has all of it)."""

    vocab_size: int
    d_model: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    ffn_width: int
    activation: str
    position: str
    dropout: float
    attention_width: int  # num_heads * head_size: queries and the attention output
    kv_width: int  # num_kv_heads * head_size: keys and values (narrower under grouped-query attention)

    @classmethod
    def of(cls, config) -> ModelShape:
        return cls(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            max_seq_len=config.max_seq_len,
            ffn_width=config.ffn_width,
            activation=config.activation,
            position=config.position,
            dropout=config.dropout,
            attention_width=config.num_heads * config.head_size,
            kv_width=config.kv_heads * config.head_size,
        )


def layer_activation_bytes(shape: ModelShape, seq_len: int, precision: str) -> int:
    """Bytes one block saves for backward, per token (pre- and post-norm alike).

    The residual stream and the LayerNorm inputs stay fp32 under autocast; each linear saves its input
    (cast to 16 bits under autocast); SDPA saves q, k, v, its output and the log-sum-exp; the FFN saves
    its up-projection and activation (gelu and relu2: 2 × d_ff, relu: 1, swiglu: 4).
    """
    a, h, f = BYTES[precision], shape.d_model, shape.ffn_width
    residual = 4 * 2 * h  # block input and the sum after attention, both saved by the norms
    q, kv = shape.attention_width, shape.kv_width
    attention = a * (h + q + 2 * kv + q + q)  # norm output into qkv, q/k/v, SDPA output, its copy into proj
    if shape.position == "rope":
        attention += a * (q + kv)  # rotated q and k are new tensors
    attention += 4 * shape.num_heads  # log-sum-exp per head
    ffn = a * h + a * {"gelu": 2, "gelu_tanh": 2, "relu": 1, "relu2": 2, "swiglu": 4}[shape.activation] * f
    # Freed temporaries (branch outputs, residual sums) leave ~one fp32 residual-stream row per layer that the
    # allocator does not hand back: measured on CPU (glibc), ~h to 2.7h bytes·4 per token and layer.
    slack = 4 * h
    total = residual + attention + ffn + slack
    if shape.dropout > 0:  # masks of 3 dropouts, and the math-path attention: probabilities, mask, dropped
        total += 3 * h + shape.num_heads * seq_len * (4 + 1 + 4)
    return total


def head_activation_bytes(shape: ModelShape, precision: str) -> int:
    """Bytes per token outside the blocks at the start of backward: the final norm's input and output, the
    saved log-softmax (fp32 even under autocast) and the two logits-sized gradients that backward starts with;
    plus backward's working space in a block: the residual stream's gradient (fp32) with the gradients of one
    FFN hidden layer and of a block input."""
    a, h = BYTES[precision], shape.d_model
    working = 4 * h + a * (shape.ffn_width + h)
    return 4 * h + a * h + 3 * 4 * shape.vocab_size + working


def activation_bytes(
    shape: ModelShape, micro_batch: int, seq_len: int, precision: str, checkpointing: bool = False
) -> int:
    """Activation memory of one micro-batch of `micro_batch` sequences of `seq_len` tokens, in bytes.

    With activation checkpointing each block keeps only its fp32 input and one block's activations are
    rebuilt at a time in backward.
    """
    tokens = micro_batch * seq_len
    layer = layer_activation_bytes(shape, seq_len, precision)
    blocks = shape.num_layers * 4 * shape.d_model + layer if checkpointing else shape.num_layers * layer
    return tokens * (blocks + head_activation_bytes(shape, precision))


def memory_estimate(
    shape: ModelShape,
    *,
    total_params: int,
    trainable_params: int,
    linear_weights: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    optimizer_bytes: tuple[int, int],
    strategy: str = "single",
    world_size: int = 1,
    checkpointing: bool = False,
) -> dict[str, int]:
    """Peak memory per process in bytes, by part; `total` is the sum that is compared with the device.

    weights: fp32 parameters, plus 16-bit copies of the linear weights (`linear_weights` elements) that
    autocast makes in forward and backward keeps. FSDP shards weights, gradients and optimizer state over
    `world_size` processes; DDP keeps a second copy of the gradients in its all-reduce buckets. The
    optimizer's update allocates its temporary after activations are freed, so the peak is the larger of the
    two. `optimizer_bytes`: bytes per trainable parameter of the optimizer's state and of its update's
    temporary (lmtrain.train.optim.MEMORY_PER_PARAMETER).
    """
    shard = world_size if strategy == "fsdp" else 1
    weights = 4 * total_params // shard
    if precision != "fp32":
        weights += BYTES[precision] * linear_weights // shard
    gradients = 4 * trainable_params // shard * (2 if strategy == "ddp" else 1)
    state_bytes, temporary_bytes = optimizer_bytes
    optim = state_bytes * trainable_params // shard
    activations = activation_bytes(shape, micro_batch, seq_len, precision, checkpointing)
    transient = temporary_bytes * trainable_params // shard
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optim,
        "activations": activations,
        "total": weights + gradients + optim + max(activations, transient),
    }


def largest_micro_batch(memory: dict[str, int], micro_batch: int, available: int) -> int:
    """The largest micro-batch whose estimate fits in `available` bytes (0 if even one sequence does not):
    everything but the activations is independent of the batch, and activations grow linearly with it."""
    static = memory["weights"] + memory["gradients"] + memory["optimizer"] + memory.get("reference", 0)
    per_sequence = memory["activations"] / micro_batch
    return max(0, int((available - static) // per_sequence))


def finetune_steps(examples: int, micro_batch: int, accumulation: int, world_size: int, epochs: float) -> int:
    """Optimizer steps of `epochs` passes over `examples` (a partial last step counts as one)."""
    per_epoch = max(1, math.ceil(examples / (micro_batch * accumulation * world_size)))
    return math.ceil(epochs * per_epoch)


def token_counts(
    micro_batch: int, mean_len: float, longest: int, accumulation: int, world_size: int, max_steps: int
) -> dict:
    """Tokens per step (sequences × their mean length × micro-batches × processes) and per run."""
    per_step = micro_batch * mean_len * accumulation * world_size
    return {
        "micro_batch_size": micro_batch,
        "seq_len": mean_len,  # finetuning: the mean example length
        "longest": longest,  # the longest micro-batch's length, which sets the memory peak
        "accumulation_steps": accumulation,
        "processes": world_size,
        "per_step": per_step,
        "per_run": per_step * max_steps,
        "max_steps": max_steps,
    }


def with_references(memory: dict[str, int], total_params: int, copies: int) -> dict[str, int]:
    """The estimate with `copies` frozen fp32 copies of the model beside it (a preference run's reference
    model: its weights only, no gradients or optimizer state), as `reference` and in `total`."""
    if not copies:
        return memory
    reference = 4 * total_params * copies
    return {**memory, "reference": reference, "total": memory["total"] + reference}


def fit(memory: dict[str, int], micro_batch: int, device_bytes: int) -> dict:
    """Whether the estimate fits in the device's `device_bytes`, and the largest micro-batch that does."""
    return {
        "device_bytes": device_bytes,
        "fits": memory["total"] <= device_bytes,
        "largest_micro_batch": largest_micro_batch(memory, micro_batch, device_bytes),
    }


def device_for(name: str, precision: str) -> Device:
    """The device of the peak table to plan for: cpu, this machine's GPU (auto, cuda), or a GPU by name."""
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


def time_estimate(
    device: Device,
    precision: str,
    *,
    flops_per_step: float,
    tokens_per_step: float,
    max_steps: int,
    world_size: int = 1,
    checkpointing: bool = False,
) -> dict:
    """Seconds per step and per run at the assumed MFU of the device's `precision` peak, on each process."""
    peak = device.peak_flops.get(precision)
    if peak is None:
        raise UserError(f"trainer.precision={precision}: {device.name} has no {precision} peak in the table")
    mfu = ASSUMED_MFU["cpu" if device.name.startswith("CPU") else "cuda"]
    # activation checkpointing runs each block's forward twice: 8 instead of 6 FLOPs per parameter and token
    hardware = 8 / 6 if checkpointing else 1.0
    step_seconds = flops_per_step * hardware / (world_size * peak * mfu)
    return {
        "device": device.name,
        "peak_flops": peak,
        "assumed_mfu": mfu,
        "step_seconds": step_seconds,
        "run_seconds": step_seconds * max_steps,
        "tokens_per_s": tokens_per_step / step_seconds,
    }


# ---- rendering -------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    """Bytes in decimal units: 1.5 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def _flops(n: float) -> str:
    """A FLOP count in decimal units: 3.2 TFLOPs."""
    for unit in ("", "K", "M", "G", "T", "P", "E"):
        if abs(n) < 1000 or unit == "E":
            return f"{n:.3g} {unit}FLOPs"
        n /= 1000
    return f"{n:.3g} EFLOPs"


def _duration(seconds: float) -> str:
    """A duration in the largest unit that keeps it readable: s, min, h or days."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(plan: dict) -> str:
    """The plan of `lmtrain plan` as the text it prints: one section per line group."""
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
        f"compute      {_flops(f['per_token']):>15}  per token (training: 6 per trained matmul weight, 4 per frozen "
        f"one, attention over {f['attention_len']:,} tokens)",
        f"             {_flops(f['per_step']):>15}  per step",
        f"             {_flops(f['per_run']):>15}  per run",
        f"tokens       {tok['per_step']:>15,.0f}  per step ({tok['micro_batch_size']} sequences × "
        f"{tok['seq_len']:,.0f} tokens × {tok['accumulation_steps']} micro-batches × {tok['processes']} processes)",
        f"             {tok['per_run']:>15,.0f}  per run ({tok['max_steps']:,} steps)",
        f"memory       per process: {mem['precision']}, {mem['optimizer_name']}, {mem['strategy']}"
        + (", activation checkpointing" if mem["activation_checkpointing"] else ""),
    ]
    for part in ("weights", "gradients", "optimizer", "activations", "reference")[: 4 + ("reference" in mem)]:
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
        lines += _measured_lines(plan["measured"], mem, tm)
    return "\n".join(lines)


def _measured_lines(ms: dict, mem: dict, tm: dict) -> list[str]:
    """The `--measure` section: the timed steps and peak memory beside their estimates."""
    error = ms["peak_memory"] / mem["total"] - 1 if mem["total"] else 0.0
    return [
        "",
        f"measured     ({ms['steps']} steps on random tokens, the first a warm-up)",
        f"             {_duration(ms['step_seconds']):>15}  per step (estimate {_duration(tm['step_seconds'])})",
        f"             {ms['tokens_per_s']:>15,.0f}  tokens/s, MFU "
        + (f"{ms['mfu']:.1%}" if ms["mfu"] is not None else "- (above the measured CPU peak)"),
        f"             {_size(ms['peak_memory']):>15}  peak memory (estimate {_size(mem['total'])}, "
        f"measured {error:+.0%}; {ms['memory_source']})",
    ]


def fitting_micro_batch(model, seq_len: int, cfg, memory_bytes: int, tokens_per_step: int, world_size: int) -> int:
    """`trainer.micro_batch_size=auto`: the largest power of two whose memory estimate (`memory_estimate`, as
    `lmtrain plan` shows it) fits in `memory_bytes` and whose rounds of micro-batch × `seq_len` × `world_size`
    tokens divide the global batch of `tokens_per_step` tokens. Raises UserError when not even one sequence
    fits."""
    import torch

    from lmtrain.train.optim import MEMORY_PER_PARAMETER

    t = cfg.trainer
    memory = memory_estimate(
        ModelShape.of(model.config),
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        linear_weights=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        micro_batch=1,
        seq_len=seq_len,
        precision=str(t.precision),
        optimizer_bytes=MEMORY_PER_PARAMETER[cfg.optimizer.name](cfg.optimizer),
        strategy="ddp" if world_size > 1 else "single",
        world_size=world_size,
        checkpointing=t.activation_checkpointing,
    )
    largest = largest_micro_batch(memory, 1, memory_bytes)
    size = 1
    while size * 2 <= largest and tokens_per_step % (size * 2 * seq_len * world_size) == 0:
        size *= 2
    if largest < 1 or tokens_per_step % (seq_len * world_size):
        raise UserError(
            f"trainer.micro_batch_size=auto: not one sequence of {seq_len} tokens fits the "
            f"{_size(memory_bytes)} available (estimated {_size(memory['total'])}); lower data.seq_len or "
            "use a smaller model"
            if largest < 1
            else f"grad_accum.global_batch_tokens: {tokens_per_step} is not a multiple of data.seq_len × processes"
        )
    return size
