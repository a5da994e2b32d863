"""What a trained model does with one text: per-token loss, attention probabilities, the logit lens, and
(for a classifier) each token's contribution to the predicted class.

Everything is read from the model's own modules through forward hooks; the model's fast SDPA path is left
as it is. The one function that knows the attention module's internals is `attention_probs`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmtrain.model.transformer import CausalSelfAttention, TransformerLM, apply_rope


def attention_probs(
    attn: CausalSelfAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(head_dim) + causal mask) of a CausalSelfAttention for its input x [B, T, d_model]
    (what the block feeds it: after norm1 in a pre-norm block); returns [B, heads, T, T], rows summing to 1.

    Reuses the module's own projections, QK-norm and RoPE, so it is what SDPA computes inside; grouped-query
    attention shares each key head among num_heads / num_kv_heads query heads.
    """
    batch, seq, _ = x.shape
    heads, kv_heads, size = attn.num_heads, attn.num_kv_heads, attn.head_size
    # the qkv matrix's rows: heads q blocks, then kv_heads k blocks, then kv_heads v blocks, each head_size
    q, k, _ = attn.qkv(x).view(batch, seq, heads + 2 * kv_heads, size).split([heads, kv_heads, kv_heads], 2)
    if attn.q_norm is not None and attn.k_norm is not None:  # both or neither (config.qk_norm)
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@dataclass
class Trace:
    """One forward pass over tokens [T] (a single sequence)."""

    logits: torch.Tensor  # [T, vocab]: next-token logits at each position
    residuals: list[torch.Tensor]  # per layer, the residual stream after the block: [T, d_model]
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [heads, T, T]


@torch.no_grad()
def trace(model: TransformerLM, tokens: torch.Tensor, attention_layers: Collection[int] = ()) -> Trace:
    """Run tokens [T] through the model, keeping each block's output and, for `attention_layers`, the
    attention probabilities (recomputed from the attention module's input)."""
    model.eval()
    residuals: list[torch.Tensor] = []
    attention: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(lambda _m, _args, out: residuals.append(out[0])))
        if i in attention_layers:

            def keep(module, args, i=i):
                x, rope = args[0], args[1]
                attention[i] = attention_probs(module, x, rope)[0]

            handles.append(block.get_submodule("attn").register_forward_pre_hook(keep))
    try:
        logits = model(tokens[None])[0]
    finally:
        for handle in handles:
            handle.remove()
    return Trace(logits.float(), residuals, attention)


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each token given the ones before it: logits [T, V] of inputs tokens[:-1] and the
    sequence tokens [T + 1] -> [T], the loss of tokens[1:]."""
    return F.cross_entropy(logits.float(), tokens[1:], reduction="none")


@torch.no_grad()
def logit_lens(model: TransformerLM, residuals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit lens (nostalgebraist 2020): each layer's residual stream [T, d_model] read through the final
    norm and the LM head. Returns the top next-token id and its probability, each [layers, T]."""
    stream = torch.stack(residuals)  # [layers, T, d_model]
    if model.final_norm is not None:
        stream = model.final_norm(stream)
    probs = model.logits(stream).float().softmax(-1)
    top = probs.max(-1)
    return top.indices, top.values


def contributions(model: TransformerLM, tokens: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Gradient × input (Shrikumar et al. 2017; Denil et al. 2014) for a classifier reading the last position
    of tokens [T]: returns the predicted class, the class probabilities [classes], and each token's
    contribution to the predicted class's logit [T] (sum over d_model of embedding × its gradient)."""
    model.eval()
    kept: list[torch.Tensor] = []

    def retain(_module, _args, out):
        out.retain_grad()
        kept.append(out)

    handle = model.token_embedding.register_forward_hook(retain)
    try:
        with torch.enable_grad():
            logits = model(tokens[None], last_positions=torch.tensor([len(tokens) - 1], device=tokens.device))[0]
            predicted = int(logits.argmax())
            logits[predicted].backward()
    finally:
        handle.remove()
    embedded = kept[0]  # [1, T, d_model]
    assert embedded.grad is not None, "retain_grad keeps the embedding's gradient"
    model.zero_grad(set_to_none=True)
    scores = (embedded * embedded.grad).sum(-1)[0].detach().float()
    return predicted, logits.detach().float().softmax(-1), scores
