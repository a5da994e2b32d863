"""Sampling with a KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch

from lmtrain.model import KVCache, TransformerLM


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits [B, V] with everything outside the top-k / top-p set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the most likely one always stays)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """prompt [B, T] int64 -> [B, T + n] with n <= max_new_tokens new tokens.

    When the context fills up, the cache is rebuilt from the last half of the context, so generation can
    run past max_seq_len at the cost of one re-encoding every max_seq_len/2 tokens.
    """
    model.eval()
    max_len = model.config.max_seq_len
    dtype = next(model.parameters()).dtype
    tokens = prompt
    cache = KVCache(model.config, prompt.shape[0], prompt.device, dtype)
    logits = model(tokens[:, -max_len:], cache)[:, -1]
    for _ in range(max_new_tokens):
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        if stop_token is not None and bool((next_token == stop_token).all()):
            break
        if cache.length >= max_len:
            cache = KVCache(model.config, prompt.shape[0], prompt.device, dtype)
            logits = model(tokens[:, -(max_len // 2) :], cache)[:, -1]
        else:
            logits = model(next_token, cache)[:, -1]
    return tokens
