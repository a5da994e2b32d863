"""`lmtrain generate`: load a checkpoint and its tokenizer, and sample a continuation of a prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from lmtrain.config import GenerateConfig
from lmtrain.data.tokenizer import end_of_text_id, warn_unknown
from lmtrain.distributed import resolve_device
from lmtrain.errors import UserError
from lmtrain.generate import generate
from lmtrain.pretrained import load_model, load_task_info
from lmtrain.tasks import Task


def run(cfg: GenerateConfig, run_dir: str) -> None:
    device = resolve_device(cfg.device, "device")
    model, tokenizer = load_model(cfg.ckpt, device)
    prompt = cfg.prompt
    if cfg.prompt_file:  # checked before any compute: a UTF-8 text file (lmtrain.config.paths)
        prompt = Path(cfg.prompt_file).expanduser().read_text(encoding="utf-8")
    stop = end_of_text_id(tokenizer)
    info = load_task_info(cfg.ckpt)
    if info is not None and info.name == "classification":
        raise UserError("ckpt: a classification checkpoint does not generate text; use lmtrain predict")
    formatted = info is not None and (info.instruction or info.name in ("seq2seq", "qa"))
    if formatted:  # the prompt as the task trained it; print only the answer
        if info.name == "qa" and cfg.context is None:
            raise UserError("context: a qa checkpoint answers a question (prompt=...) about a passage (context=...)")
        roles = {
            "seq2seq": {"source": prompt},
            "qa": {"question": prompt, "context": cfg.context},
            "lm": {"prompt": prompt},
        }[info.name]
        task = Task(info, tokenizer, model.config.max_seq_len)
        ids = task.prompt_ids({info.fields[role]: text for role, text in roles.items()})
    else:
        warn_unknown(tokenizer, [prompt], "prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else [stop]
    prompt_tokens = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(
        model,
        prompt_tokens,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        generator=generator,
        stop_token=stop,
    )
    for i, sample in enumerate(out.tolist()):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        if formatted:
            sample = sample[len(ids) :]
            sample = sample[: sample.index(stop)] if stop in sample else sample
        print(tokenizer.decode(sample))  # the end-of-text token is special: decode skips it
