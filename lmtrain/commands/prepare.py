"""`lmtrain prepare`: tokenize pretrain's corpus (or each source of a mixture) into its token cache once, ahead of
training and of the many runs that share it. It reads pretrain's config: the data group, and init_from for an
existing tokenizer. A streamed corpus (data.streaming=true) is never prepared: only its tokenizer is made."""

from __future__ import annotations

import logging
import time

from lmtrain.config import PretrainConfig
from lmtrain.data import mixture, streaming, tokens

log = logging.getLogger("lmtrain")


def run(cfg: PretrainConfig, run_dir: str) -> None:
    d = cfg.data
    existing, end_of_text = None, None
    if cfg.init_from:  # the model's own tokenizer: nothing to train
        from lmtrain.checkpoint.load import load_special_tokens, load_tokenizer  # torch: only for a checkpoint

        existing = load_tokenizer(cfg.init_from, key="init_from")
        end_of_text = load_special_tokens(cfg.init_from, existing, key="init_from").end_of_text
    started = time.perf_counter()
    settings = tokens.corpus_settings(d)
    if d.streaming:
        tokenizer = streaming.tokenizer(settings, existing)
        log.info(
            "data.streaming: tokenizer ready (vocabulary %d); the stream is read while training",
            tokenizer.get_vocab_size(),
        )
        return
    if d.sources:
        sources = mixture.prepare(d.sources, settings, existing, end_of_text)
    else:
        sources = [mixture.Source("train", 1.0, tokens.prepare(**settings, existing=existing, end_of_text=end_of_text))]
    for source in sources:
        log.info(
            "prepared %s (%s): %s train / %s validation tokens, vocabulary %d",
            source.name,
            source.data.cache_path,
            f"{len(source.data.train):,}",
            f"{len(source.data.validation):,}",
            source.data.tokenizer.get_vocab_size(),
        )
    log.info("done in %.1f s", time.perf_counter() - started)
