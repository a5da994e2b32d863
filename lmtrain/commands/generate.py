"""`lmtrain generate`: load a checkpoint (or a Hugging Face folder) and its tokenizer, and sample a continuation
of a prompt. Sampling settings left unset come from the model's generation_config.json, else lmtrain's
defaults; generation stops at any of the model's end tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.config import GenerateConfig
from lmtrain.core.distributed import resolve_device
from lmtrain.core.errors import UserError
from lmtrain.data.tokenizer import SpecialTokens, warn_unknown
from lmtrain.model.generate import generate
from lmtrain.tasks.base import load_task_info
from lmtrain.tasks.chat import Chat
from lmtrain.tasks.registry import task_class, task_for

DEFAULTS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "top_p": 1.0}


def sampling(cfg: GenerateConfig, special: SpecialTokens, context: int) -> dict:
    """max_new_tokens, temperature, top_k, top_p: the command line's, else the model's generation_config.json
    (do_sample=false means greedy; its max_new_tokens at most the `context` the model attends to), else
    DEFAULTS. top_k=0 and top_p=1 switch those filters off."""
    model_defaults = dict(special.generation)
    if model_defaults.pop("do_sample", True) is False:
        model_defaults["temperature"] = 0.0
    if "max_new_tokens" in model_defaults:
        model_defaults["max_new_tokens"] = min(model_defaults["max_new_tokens"], context)
    chosen = {key: getattr(cfg, key) for key in DEFAULTS}
    return {
        key: value if value is not None else model_defaults.get(key, DEFAULTS[key]) for key, value in chosen.items()
    }


def run(cfg: GenerateConfig, run_dir: str) -> None:
    device = resolve_device(cfg.device, "device")
    assert cfg.ckpt is not None, "ckpt is checked before the run"
    model, tokenizer = load_model(cfg.ckpt, device)
    special = load_special_tokens(cfg.ckpt, tokenizer)
    prompt = cfg.prompt
    if cfg.prompt_file:  # checked before any compute: a UTF-8 text file (lmtrain.config.paths)
        prompt = Path(cfg.prompt_file).expanduser().read_text(encoding="utf-8")
    stop = special.end_of_text
    info = load_task_info(cfg.ckpt)
    if info is not None and not task_class(info.name).generates:
        raise UserError(f"ckpt: a {info.name} checkpoint does not generate text; use lmtrain predict")
    if cfg.chat:  # one user turn, in the model's chat template, whatever the checkpoint trained
        info = Chat.plain_info()
    # the prompt as the task trained it (then only the answer is printed), else None
    task = task_for(info, tokenizer, model.config.max_seq_len, special) if info is not None else None
    ids = task.user_prompt_ids(prompt, cfg.context, cfg.system) if task is not None else None
    formatted = ids is not None
    if ids is None:  # with the tokenizer's own framing (a BOS for Llama-style tokenizers)
        warn_unknown(tokenizer, [prompt], "prompt")
        ids = (
            tokenizer.encode(prompt).ids
            if prompt
            else [special.bos if special.adds_bos and special.bos is not None else stop]
        )
    settings = sampling(cfg, special, model.config.max_seq_len)
    prompt_tokens = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(
        model,
        prompt_tokens,
        settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_k=settings["top_k"] or None,
        top_p=settings["top_p"],
        generator=generator,
        stop_tokens=special.stop,
    )
    for i, sample in enumerate(out.tolist()):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        new = sample[len(ids) :]
        ends = [j for j, token in enumerate(new) if token in special.stop]
        new = new[: ends[0]] if ends else new
        print(tokenizer.decode(new if formatted else sample[: len(ids)] + new))  # decode skips special tokens
