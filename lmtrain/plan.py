"""What a training run will cost before it runs: parameters, FLOPs, tokens, memory and time.

Memory is counted per process in bytes: fp32 weights (plus the 16-bit copies autocast keeps for backward),
fp32 gradients, optimizer state, and the activations autograd saves for backward. The activation count
follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4),
redone for this model's modules: SDPA saves its output and log-sum-exp rather than the T×T scores, except
with attention dropout, whose math path does save them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def optimizer_state_bytes(name: str, trainable: int, momentum: float = 0.9) -> int:
    """fp32 state: Adam(W) keeps two moments per parameter, SGD one momentum buffer (none without momentum);
    muon one buffer for the blocks' matrices and AdamW's two for the rest, so at most two (counted as such)."""
    per_param = {"adamw": 8, "adam": 8, "muon": 8, "sgd": 4 if momentum > 0 else 0}[name]
    return per_param * trainable


def memory_estimate(
    shape: ModelShape,
    *,
    total_params: int,
    trainable_params: int,
    linear_weights: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    optimizer: str,
    momentum: float = 0.9,
    strategy: str = "single",
    world_size: int = 1,
    checkpointing: bool = False,
) -> dict[str, int]:
    """Peak memory per process in bytes, by part; `total` is the sum that is compared with the device.

    weights: fp32 parameters, plus 16-bit copies of the linear weights (`linear_weights` elements) that
    autocast makes in forward and backward keeps. FSDP shards weights, gradients and optimizer state over
    `world_size` processes; DDP keeps a second copy of the gradients in its all-reduce buckets. The
    optimizer's foreach update allocates one parameter-sized temporary after activations are freed, so the
    peak is the larger of the two.
    """
    shard = world_size if strategy == "fsdp" else 1
    weights = 4 * total_params // shard
    if precision != "fp32":
        weights += BYTES[precision] * linear_weights // shard
    gradients = 4 * trainable_params // shard * (2 if strategy == "ddp" else 1)
    optim = optimizer_state_bytes(optimizer, trainable_params, momentum) // shard
    activations = activation_bytes(shape, micro_batch, seq_len, precision, checkpointing)
    transient = 4 * trainable_params // shard if optimizer in ("adamw", "adam", "muon") else 0
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
    static = memory["weights"] + memory["gradients"] + memory["optimizer"]
    per_sequence = memory["activations"] / micro_batch
    return max(0, int((available - static) // per_sequence))
