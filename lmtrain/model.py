"""A decoder-only causal Transformer LM. Plain PyTorch: no Hydra, no files, usable on its own."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    max_seq_len: int = 128
    d_ff: int | None = None  # None: 4*d_model, or 8/3*d_model rounded to 64 for swiglu
    dropout: float = 0.0
    activation: str = "gelu"  # relu | gelu | swiglu
    norm_position: str = "pre"  # pre | post
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = False
    init_std: float = 0.02
    num_classes: int = 0  # > 0: a classification head over the hidden state of a chosen position

    @property
    def ffn_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model


class KVCache:
    """Keys and values of every layer for incremental decoding: [batch, heads, max_seq_len, head_dim]."""

    def __init__(self, config: TransformerConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.num_heads, config.max_seq_len, config.d_model // config.num_heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0  # positions filled so far


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim // 2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x [B, H, T, D] by the angles of its positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None,
    ) -> torch.Tensor:
        batch, seq, width = x.shape
        # [B, T, 3C] -> 3 × [B, H, T, C/H]
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal, mask = True, None
        if cache is not None:
            keys, values, start = cache
            keys[:, :, start : start + seq] = k
            values[:, :, start : start + seq] = v
            k, v = keys[:, :, : start + seq], values[:, :, : start + seq]
            if start > 0:
                # query i (absolute position start+i) sees keys 0..start+i
                is_causal = False
                mask = torch.ones(seq, start + seq, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, width)))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.ffn_width
        self.activation = config.activation
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.gate = nn.Linear(config.d_model, hidden, bias=config.bias) if config.activation == "swiglu" else None
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            hidden = F.silu(self.gate(x)) * self.up(x)
        elif self.activation == "relu":
            hidden = F.relu(self.up(x))
        else:
            hidden = F.gelu(self.up(x))
        return self.dropout(self.down(hidden))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, rope=None, cache=None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, cache)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache))
        return self.norm2(x + self.ffn(x))


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        )
        if config.position == "rope":
            cos, sin = rope_tables(config.d_model // config.num_heads, config.max_seq_len, config.rope_theta)
            # Derived from the config, so not saved in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        # Post-norm blocks end in a norm already; pre-norm needs one before the head.
        self.final_norm = nn.LayerNorm(config.d_model, bias=config.bias) if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.classifier = nn.Linear(config.d_model, config.num_classes) if config.num_classes > 0 else None
        self.activation_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream so its variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=config.init_std / math.sqrt(2 * config.num_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, d_model]."""
        seq = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + seq} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(start, start + seq, device=tokens.device))
        rope = None
        if self.config.position == "rope":
            rope = (self.rope_cos[start : start + seq], self.rope_sin[start : start + seq])
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.keys[i], cache.values[i], start) if cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layer_cache, use_reentrant=False)
            else:
                x = block(x, rope, layer_cache)
        if cache is not None:
            cache.length = start + seq
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, last_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, T] -> next-token logits [B, T, vocab_size]; or, given last_positions [B] (the index of
        each sequence's last real token), class logits [B, num_classes] from the hidden state there.
        Right padding needs no attention mask: causal attention never looks ahead at it."""
        hidden = self.hidden_states(tokens, cache)
        if last_positions is None:
            return self.lm_head(hidden)
        if self.classifier is None:
            raise ValueError("this model has no classification head (num_classes=0)")
        return self.classifier(hidden[torch.arange(hidden.shape[0], device=hidden.device), last_positions])

    def add_classifier(self, num_classes: int) -> None:
        """A fresh classification head (for finetuning a pretrained LM on a classification task)."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.classifier = nn.Linear(self.config.d_model, num_classes, device=self.token_embedding.weight.device)
        self._init_weights(self.classifier)

    def remove_classifier(self) -> None:
        self.config = dataclasses.replace(self.config, num_classes=0)
        self.classifier = None

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate (embedding, attention, residual), e.g. for finetuning."""
        self.config = dataclasses.replace(self.config, dropout=p)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention):
                module.dropout = p

    def freeze(self, embeddings: bool = False, first_blocks: int = 0) -> None:
        """Stop training the embeddings (and so a tied LM head) and/or the first `first_blocks` blocks."""
        modules = [self.blocks[i] for i in range(min(first_blocks, len(self.blocks)))]
        if embeddings:
            modules += [m for m in (self.token_embedding, self.position_embedding) if m is not None]
        for module in modules:
            module.requires_grad_(False)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if not self.config.tie_embeddings:
                total -= self.token_embedding.weight.numel()
            if self.position_embedding is not None:
                total -= self.position_embedding.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul parameter plus attention scores (PaLM, appendix B)."""
        c = self.config
        return 6 * self.num_parameters(exclude_embeddings=True) + 12 * c.num_layers * c.d_model * c.max_seq_len
