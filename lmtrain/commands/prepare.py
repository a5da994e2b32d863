"""`lmtrain prepare`: tokenize pretrain's corpus into its token cache once, ahead of training (and of many runs
that share it). It reads pretrain's config: the data group, and init_from for an existing tokenizer."""

from __future__ import annotations

import logging
import time

from lmtrain.config import PretrainConfig
from lmtrain.data import tokens
from lmtrain.pretrained import load_special_tokens, load_tokenizer

log = logging.getLogger("lmtrain")


def run(cfg: PretrainConfig, run_dir: str) -> None:
    existing, end_of_text = None, None
    if cfg.init_from:  # the model's own tokenizer: nothing to train
        existing = load_tokenizer(cfg.init_from, key="init_from")
        end_of_text = load_special_tokens(cfg.init_from, existing, key="init_from").end_of_text
    started = time.perf_counter()
    data = tokens.prepare(**tokens.corpus_settings(cfg.data), existing=existing, end_of_text=end_of_text)
    log.info(
        "prepared %s: %s train / %s validation tokens, vocabulary %d, in %.1f s",
        data.cache_path,
        f"{len(data.train):,}",
        f"{len(data.validation):,}",
        data.tokenizer.get_vocab_size(),
        time.perf_counter() - started,
    )
