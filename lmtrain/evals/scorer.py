"""Log-likelihoods, rolling log-likelihoods and greedy generations from a TransformerLM, with the tokenization of
lm-evaluation-harness's `HFLM` (`lm_eval.models.huggingface`) so the numbers are the same:

- a (context, continuation) pair: trailing spaces of the context move to the continuation; the continuation's
  tokens are encode(context + continuation) past the first len(encode(context)) tokens; an empty context is the
  model's BOS (else EOS) token; input longer than max_seq_len + 1 is cut from the left.
- generation: the context, cut from the left to max_seq_len - max_gen_toks tokens, is continued greedily for at
  most max_gen_toks tokens; the text (special tokens skipped, ending at the end-of-sequence token) is cut at the
  first stop string.

Speed: requests are scored in batches, longest first, the choices of a question in the same batch; generations
run in batches of equal-length prompts, longest first, with a KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from tokenizers import Tokenizer

from lmtrain.core.dtypes import autocast_dtype
from lmtrain.data.tokenizer import SpecialTokens
from lmtrain.model.transformer import KVCache, TransformerLM

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class Scorer:
    """A model, its tokenizer and special tokens, on `device` with autocast in `precision`."""

    def __init__(
        self,
        model: TransformerLM,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        device: torch.device,
        precision: str = "fp32",
        batch_size: int = 32,
    ):
        self.model, self.tokenizer, self.special = model, tokenizer, special
        self.device, self.precision, self.batch_size = device, precision, batch_size
        self.max_length = model.config.max_seq_len
        self.prefix_token = special.bos if special.bos is not None else special.end_of_text

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def pair(self, context: str, continuation: str) -> Pair:
        """HFLM's tokenization of one loglikelihood request (`TemplateLM.loglikelihood`, `_encode_pair`)."""
        if context == "":
            tokens = self.encode(continuation, special=False)
            return ([self.prefix_token], tokens) if tokens[:1] != [self.prefix_token] else (tokens[:1], tokens[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_tokens = self.encode(context)
        return context_tokens, whole[len(context_tokens) :]

    def _autocast(self):
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """log-softmax [B, T, V] (float32) of the model on tokens [B, T]."""
        with torch.no_grad(), self._autocast():
            return self.model(tokens, cache).float().log_softmax(-1)

    def loglikelihoods(self, pairs: list[Pair], progress: Callable[[int], None] = lambda n: None) -> list[tuple]:
        """(summed log-likelihood of the continuation, whether greedy decoding gives it) for each pair.

        Pairs with the same context (a question's choices) go into the same batch; batches hold about
        `batch_size` rows, longest first, right-padded (causal attention never sees the padding)."""
        self.model.eval()
        results: list[tuple] = [None] * len(pairs)  # type: ignore[list-item]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            groups.setdefault(tuple(context), []).append(i)
        ordered = sorted(groups.values(), key=lambda g: -max(len(pairs[i][0]) + len(pairs[i][1]) for i in g))
        batch: list[int] = []
        for members in ordered:
            batch += members
            if len(batch) >= self.batch_size or members is ordered[-1]:
                for i, result in zip(batch, self._batch([pairs[i] for i in batch]), strict=True):
                    results[i] = result
                progress(len(batch))
                batch = []
        return results

    def _batch(self, pairs: list[Pair]) -> list[tuple]:
        """HFLM's input for each pair, (context + continuation)[-(max_length + 1):][:-1], in one forward pass."""
        rows = [(context + continuation)[-(self.max_length + 1) :][:-1] for context, continuation in pairs]
        width = max(len(row) for row in rows)
        log_probs = self._forward(torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self.device))
        return [
            self._score(log_probs[i, len(row) - len(continuation) : len(row)], continuation)
            for i, (row, (_, continuation)) in enumerate(zip(rows, pairs, strict=True))
        ]

    def _score(self, log_probs: torch.Tensor, continuation: list[int]) -> tuple:
        target = torch.tensor(continuation, device=log_probs.device)
        greedy = bool((log_probs.argmax(-1) == target).all())
        return float(log_probs.gather(1, target[:, None]).sum()), greedy

    def rolling(self, text: str) -> float:
        """Log-likelihood of a whole text in disjoint windows of max_length tokens (HFLM.loglikelihood_rolling,
        `get_rolling_token_windows` with context_len=1): the first window starts from the prefix token."""
        tokens = self.encode(text)
        full = [self.prefix_token, *tokens]  # tokens[j] is predicted from full[: j + 1]
        total, done = 0.0, 0
        while done < len(tokens):
            end = min(len(tokens), done + self.max_length)
            window = full[max(0, end - self.max_length) : end]
            log_probs = self._forward(torch.tensor([window], device=self.device))[0]
            total += self._score(log_probs[-(end - done) :], tokens[done:end])[0]
            done = end
        return total

    def generate(
        self, contexts: list[str], until: list[str], max_gen_toks: int, progress: Callable[[int], None] = lambda n: None
    ) -> list[str]:
        """Greedy continuations of `contexts`, each cut at the first of `until` (HFLM.generate_until)."""
        self.model.eval()
        keep = self.max_length - max_gen_toks
        if keep <= 0:
            raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in {self.max_length} tokens")
        prompts = [self.encode(c)[-keep:] for c in contexts]
        texts: list[str] = [""] * len(contexts)
        for batch in self._equal_length_batches(prompts):
            for i, text in zip(batch, self._greedy([prompts[i] for i in batch], until, max_gen_toks), strict=True):
                texts[i] = text
            progress(len(batch))
        return texts

    def _equal_length_batches(self, prompts: list[list[int]]) -> Iterator[list[int]]:
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(i)
        for length in sorted(by_length, reverse=True):
            members = by_length[length]
            for start in range(0, len(members), self.batch_size):
                yield members[start : start + self.batch_size]

    def _greedy(self, prompts: list[list[int]], until: list[str], max_gen_toks: int) -> list[str]:
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, len(prompts), self.device, dtype, len(prompts[0]) + max_gen_toks)
        stops = torch.tensor(sorted(set(self.special.stop)), device=self.device)
        log_probs = self._forward(torch.tensor(prompts, device=self.device), cache)[:, -1]
        generated = torch.empty(len(prompts), 0, dtype=torch.long, device=self.device)
        ended = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for step in range(max_gen_toks):
            token = log_probs.argmax(-1, keepdim=True)
            generated = torch.cat([generated, token], dim=1)
            ended |= torch.isin(token[:, 0], stops)
            if bool(ended.all()) or step == max_gen_toks - 1:
                break
            if until and self._all_stopped(generated, ended, until):
                break
            log_probs = self._forward(token, cache)[:, -1]
        return [self._text(row, until) for row in generated.tolist()]

    def _all_stopped(self, generated: torch.Tensor, ended: torch.Tensor, until: list[str]) -> bool:
        if (generated.shape[1] & 3) != 0:  # decoding every step costs more than the few steps it saves
            return False
        return all(
            e or any(u and u in self._decode(row) for u in until)
            for row, e in zip(generated.tolist(), ended.tolist(), strict=True)
        )

    def _decode(self, row: list[int]) -> str:
        stop = set(self.special.stop)
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        return self.tokenizer.decode(row[:end], skip_special_tokens=True)

    def _text(self, row: list[int], until: list[str]) -> str:
        text = self._decode(row)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text
