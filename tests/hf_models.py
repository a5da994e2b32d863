"""Tiny random Hugging Face models, built and saved locally with `transformers` (a test dependency)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "def f(x):\n    return x + 1\n") * 20
SPECIALS = {
    "gpt2": {"eos": "<|endoftext|>", "bos": "<|endoftext|>"},
    "llama": {
        "eos": "<|end_of_text|>",
        "bos": "<|begin_of_text|>",
        "extra": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    },
    "mistral": {"eos": "</s>", "bos": "<s>"},
    "qwen2": {"eos": "<|im_end|>", "extra": ["<|endoftext|>", "<|im_start|>"]},
    "qwen3": {"eos": "<|im_end|>", "extra": ["<|endoftext|>", "<|im_start|>"]},
}


def tokenizer_for(family: str) -> tuple[Tokenizer, dict]:
    special = SPECIALS[family]
    names = list(
        dict.fromkeys([special["eos"], *([special["bos"]] if "bos" in special else []), *special.get("extra", [])])
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=names, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    if family in ("llama", "mistral"):  # these tokenizers put BOS in front of every text
        from tokenizers import processors

        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer, special


def build(family: str, folder: Path, *, shard: bool = False, chat_template: str | None = None, **overrides) -> Path:
    """A random `family` model with a trained byte-level BPE tokenizer, saved in `folder`."""
    import transformers

    tokenizer, special = tokenizer_for(family)
    eos = tokenizer.token_to_id(special["eos"])
    bos = tokenizer.token_to_id(special["bos"]) if "bos" in special else None
    vocab = 320  # larger than the tokenizer, as real models pad theirs
    small = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=96, **small)
    else:
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
        }[family]
        kwargs = dict(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=96,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            **small,
        )
        if family == "llama":
            kwargs["rope_parameters"] = {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
            kwargs["tie_word_embeddings"] = True
        if family == "mistral":
            kwargs["sliding_window"] = 4096
        if family == "qwen3":
            kwargs["head_dim"] = 32  # not hidden_size / heads
        kwargs.update(overrides)
        config = cls(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and biases too, so a wrong mapping of either shows
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=special["eos"], bos_token=special.get("bos"), chat_template=chat_template
    )
    fast.save_pretrained(folder)
    if family == "llama":  # several end tokens, as Llama 3 has
        model.generation_config.eos_token_id = [eos, tokenizer.token_to_id("<|eot_id|>")]
        model.generation_config.save_pretrained(folder)
    return folder
