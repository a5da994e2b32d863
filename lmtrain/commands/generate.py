"""`lmtrain generate`: load a checkpoint and its tokenizer, and sample a continuation of a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmtrain import checkpoint
from lmtrain.config import GenerateConfig
from lmtrain.data.tokenizer import end_of_text_id
from lmtrain.distributed import resolve_device
from lmtrain.errors import UserError
from lmtrain.generate import generate
from lmtrain.model import TransformerConfig, TransformerLM


def load_model(path: str, device: torch.device) -> tuple[TransformerLM, Tokenizer]:
    """A model and tokenizer from a checkpoint (or run dir, or `latest`)."""
    source = checkpoint.resolve(path, "ckpt")
    with checkpoint.readable(source, "ckpt"):
        model = TransformerLM(TransformerConfig(**json.loads((source / "model.json").read_text())))
        checkpoint.load_weights(model, source)
        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    return model.to(device), tokenizer


def run(cfg: GenerateConfig, run_dir: str) -> None:
    device = resolve_device(cfg.device, "device")
    model, tokenizer = load_model(cfg.ckpt, device)
    prompt = cfg.prompt
    if cfg.prompt_file:
        path = Path(cfg.prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompt_file: no such file '{cfg.prompt_file}'")
        prompt = path.read_text()
    stop = end_of_text_id(tokenizer)
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
        print(tokenizer.decode(sample))  # the end-of-text token is special: decode skips it
