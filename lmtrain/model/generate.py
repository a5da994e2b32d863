"""Sampling with a KV cache: temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from lmtrain.model.transformer import KVCache, TransformerLM

TOP_P_TOLERANCE = 1e-6  # float32 sums of probabilities are off by a few ulps: 0.5 + 0.3 gives 0.79999995


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits [B, V] with everything outside the top-k / top-p set to -inf.

    top-k keeps every token tied with the k-th; top-p keeps the smallest set of most likely tokens whose
    mass reaches top_p (within TOP_P_TOLERANCE), and always the most likely token.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.double().softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p - TOP_P_TOLERANCE
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, shifted so the largest is 0: no overflow to inf at tiny temperatures."""
    return (logits - logits.max(dim=-1, keepdim=True).values) / temperature


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
    stop_tokens: Collection[int] = (),
) -> torch.Tensor:
    """prompt [B, T] int64 -> [B, T + n] with n <= max_new_tokens new tokens; generation ends early once every
    sequence has produced one of `stop_tokens` (what follows it in a sequence is filler: cut it off).

    When the context fills up, the cache is rebuilt from the last half of the context, so generation can
    run past max_seq_len at the cost of one re-encoding every max_seq_len/2 tokens.
    """
    model.eval()
    max_len = model.config.max_seq_len
    dtype = next(model.parameters()).dtype
    tokens = prompt
    length = min(prompt.shape[1], max_len) + max_new_tokens
    cache = KVCache(model.config, prompt.shape[0], prompt.device, dtype, length)
    logits = model(tokens[:, -max_len:], cache)[:, -1]
    stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=prompt.device)
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = filter_logits(scale(logits.float(), temperature), top_k, top_p).softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        if len(stops):
            finished |= torch.isin(next_token[:, 0], stops)
            if bool(finished.all()):
                break
        if cache.length >= cache.capacity:
            cache = KVCache(model.config, prompt.shape[0], prompt.device, dtype, length)
            logits = model(tokens[:, -(max_len // 2) :], cache)[:, -1]
        else:
            logits = model(next_token, cache)[:, -1]
    return tokens


@torch.no_grad()
def beam_search(
    model: TransformerLM,
    prompt: list[int],
    max_new_tokens: int,
    *,
    num_beams: int,
    stop_token: int,
    length_penalty: float = 1.0,
) -> list[int]:
    """The most likely continuation of `prompt` by beam search (log-probability / length**length_penalty).

    Returns the new tokens without the stop token. Generation ends at the context length.
    """
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(prompt))
    cache_len = len(prompt) + max(max_new_tokens, 0)
    cache = KVCache(model.config, num_beams, device, next(model.parameters()).dtype, cache_len)
    tokens = torch.tensor([prompt] * num_beams, device=device)
    log_probs = model(tokens, cache)[:, -1].float().log_softmax(-1)
    scores = torch.full((num_beams,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    sequences: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max(max_new_tokens, 0)):
        keep_beams, keep_tokens, keep_scores = _extend(
            scores, log_probs, sequences, num_beams, stop_token, length_penalty, finished
        )
        if len(finished) >= num_beams or not keep_beams:
            break
        index = torch.tensor(keep_beams, device=device)
        for layer in range(len(cache.keys)):  # each beam continues from its parent's cache
            cache.keys[layer] = cache.keys[layer][index]
            cache.values[layer] = cache.values[layer][index]
        sequences = [sequences[b] + [t] for b, t in zip(keep_beams, keep_tokens, strict=True)]
        scores = torch.tensor(keep_scores, device=device)
        log_probs = model(torch.tensor(keep_tokens, device=device)[:, None], cache)[:, -1].float().log_softmax(-1)
    finished += [
        (s / max(len(seq), 1) ** length_penalty, seq) for s, seq in zip(scores.tolist(), sequences, strict=True)
    ]
    return max(finished, key=lambda item: item[0])[1]


def _extend(
    scores: torch.Tensor,
    log_probs: torch.Tensor,
    sequences: list[list[int]],
    num_beams: int,
    stop_token: int,
    length_penalty: float,
    finished: list[tuple[float, list[int]]],
) -> tuple[list[int], list[int], list[float]]:
    """One step of beam search. `scores` [beams] and `log_probs` [beams, vocab]: of the 2 * num_beams best
    one-token extensions, those that end with `stop_token` are appended to `finished` with their score /
    length**length_penalty, and the best `num_beams` others are returned as parent beams, tokens and scores."""
    vocab = log_probs.shape[-1]
    top_scores, top_ids = (scores[:, None] + log_probs).flatten().topk(2 * num_beams)
    keep_beams, keep_tokens, keep_scores = [], [], []
    for score, flat in zip(top_scores.tolist(), top_ids.tolist(), strict=True):
        beam, token = divmod(flat, vocab)
        if token == stop_token:
            length = len(sequences[beam]) + 1
            finished.append((score / length**length_penalty, sequences[beam]))
        else:
            keep_beams.append(beam)
            keep_tokens.append(token)
            keep_scores.append(score)
        if len(keep_beams) == num_beams:
            break
    return keep_beams, keep_tokens, keep_scores
