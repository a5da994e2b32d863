"""A decoder-only causal Transformer LM. Plain PyTorch over a config dataclass: no files, usable on its own."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lmtrain.config.choices import Pooling
from lmtrain.config.schema import ModelConfig, TaskConfig


@dataclass(kw_only=True)
class TransformerConfig(ModelConfig):
    """The model's shape: the schema's `model` group (lmtrain.config.schema.ModelConfig, whose defaults are the
    only ones) plus the vocabulary and the classification head a finetune adds."""

    vocab_size: int
    num_classes: int = 0  # > 0: a classification head over the hidden state of a chosen position
    pooling: Pooling = TaskConfig.pooling  # what the classification head reads (task.pooling)

    @property
    def ffn_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


class KVCache:
    """Keys and values of every layer for incremental decoding: [batch, kv_heads, length, head_size]."""

    def __init__(
        self,
        config: TransformerConfig,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        length: int | None = None,
    ):
        length = min(length or config.max_seq_len, config.max_seq_len)
        shape = (batch_size, config.kv_heads, length, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0  # positions filled so far
        self.capacity = length


def rope_frequencies(config: TransformerConfig) -> torch.Tensor:
    """Inverse frequencies [head_size // 2] of RoPE (Su et al. 2021), with Llama 3's scaling when asked:
    long wavelengths are divided by the factor, short ones kept, and those between interpolated
    (Meta's Llama 3.1 reference, `apply_scaling`)."""
    dim = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if config.rope_scaling == "none":
        return inv_freq
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, interpolated, scaled)


def rope_tables(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [length, head_size // 2], for positions 0..length-1."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=inv_freq.device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x [B, H, T, D] by the angles of its positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


def document_layout(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed sequences, document_ids [B, T] (each document a contiguous run of one id) ->
    (positions [B, T] restarting at 0 at each document, attention mask bool [B, 1, T, T] that is causal and
    block-diagonal: a token sees earlier tokens of its own document only)."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return index - first, (same & causal).unsqueeze(1)


def make_norm(config: TransformerConfig, width: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query (num_kv_heads < num_heads) or multi-query attention with SDPA.

    The q/k/v projections are one matrix `qkv` [(heads + 2 * kv_heads) * head_size, d_model]."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = config.num_heads, config.kv_heads, config.head_size
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_size
        self.qkv = nn.Linear(config.d_model, width, bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(self.num_heads * self.head_size, config.d_model, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model]; mask: None for plain causal attention, else bool [B, 1, T, T] (True: attend)."""
        batch, seq, _ = x.shape
        heads, kv_heads, size = self.num_heads, self.num_kv_heads, self.head_size
        # [B, T, (H + 2 KV) D] -> q [B, H, T, D], k and v [B, KV, T, D]
        q, k, v = self.qkv(x).view(batch, seq, heads + 2 * kv_heads, size).split([heads, kv_heads, kv_heads], 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        is_causal = mask is None
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
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=kv_heads != heads,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, heads * size)))


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
        elif self.activation == "gelu_tanh":  # GPT-2's approximation
            hidden = F.gelu(self.up(x), approximate="tanh")
        elif self.activation == "relu2":  # squared ReLU (So et al. 2021, "Primer")
            hidden = F.relu(self.up(x)).square()
        else:
            hidden = F.gelu(self.up(x))
        return self.dropout(self.down(hidden))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm1 = make_norm(config, config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config, config.d_model)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, rope=None, cache=None, mask=None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, cache, mask)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, cache, mask))
        return self.norm2(x + self.ffn(x))


class TransformerLM(nn.Module):
    # RoPE tables, registered as (non-persistent) buffers by init_rope
    rope_inv_freq: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.max_seq_len, config.d_model) if config.position == "learned" else None
        )
        if config.position == "rope":
            self.init_rope()
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        # Post-norm blocks end in a norm already; pre-norm needs one before the head.
        self.final_norm = make_norm(config, config.d_model) if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.classifier = nn.Linear(config.d_model, config.num_classes) if config.num_classes > 0 else None
        self.activation_checkpointing = False  # recompute each block's activations in backward (saves memory)
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream so its variance does not grow with depth; or
        # (zero_init_residual, as modded-nanogpt) start them at zero, so every block begins as the identity.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                if config.zero_init_residual:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=config.init_std / math.sqrt(2 * config.num_layers))

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables from the config, e.g. after `to_empty`, which leaves buffers unset.
        They are derived, so not saved in checkpoints; past 8192 positions they grow on demand (an imported
        model's max_seq_len can be 128k positions)."""
        device = self.token_embedding.weight.device
        inv_freq = rope_frequencies(self.config).to(device)
        cos, sin = rope_tables(inv_freq, min(self.config.max_seq_len, 8192))
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def hidden_states(
        self, tokens: torch.Tensor, cache: KVCache | None = None, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, d_model].

        document_ids [B, T] (packed sequences: equal ids mark one document, each a contiguous run): attention
        stays within a document (a block-diagonal causal mask) and positions restart at each document."""
        seq = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + seq} tokens exceeds max_seq_len={self.config.max_seq_len}")
        positions, mask = torch.arange(start, start + seq, device=tokens.device), None
        if document_ids is not None:
            positions, mask = document_layout(document_ids)
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        rope = None
        if self.config.position == "rope":
            if self.rope_cos.shape[0] < start + seq:
                length = min(self.config.max_seq_len, max(start + seq, 2 * self.rope_cos.shape[0]))
                self.rope_cos, self.rope_sin = rope_tables(self.rope_inv_freq, length)
            if document_ids is None:
                rope = (self.rope_cos[start : start + seq], self.rope_sin[start : start + seq])
            else:  # [B, 1, T, head_size // 2]: each sequence its own positions
                rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.keys[i], cache.values[i], start) if cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layer_cache, mask, use_reentrant=False)
            else:
                x = block(x, rope, layer_cache, mask)
        if cache is not None:
            cache.length = start + seq
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        last_positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> next-token logits [B, T, vocab_size]; or, given last_positions [B] (the index of
        each sequence's last real token), class logits [B, num_classes] from the hidden state there.
        Right padding needs no attention mask: causal attention never looks ahead at it. With pooling=mean the
        head reads the mean hidden state of positions 0..last_positions instead. document_ids [B, T]: see
        `hidden_states`."""
        hidden = self.hidden_states(tokens, cache, document_ids)
        if last_positions is None:
            return self.logits(hidden)
        if self.classifier is None:
            raise ValueError("this model has no classification head (num_classes=0)")
        if self.config.pooling == "mean":
            # [B, T, 1]: 1 up to each sequence's last real token, 0 on the padding after it
            keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :, None] <= last_positions[:, None, None]
            return self.classifier((hidden * keep).sum(1) / keep.sum(1))
        return self.classifier(hidden[torch.arange(hidden.shape[0], device=hidden.device), last_positions])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., d_model] -> next-token logits [..., vocab_size], soft-capped when logit_softcap is
        set: cap * tanh(logits / cap) keeps every logit in (-cap, cap) (Gemma 2; modded-nanogpt)."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def tied_weights(self) -> list[tuple[str, ...]]:
        """Groups of parameter names sharing one tensor (stored once): token embedding and LM head, if tied."""
        return [("token_embedding.weight", "lm_head.weight")] if self.config.tie_embeddings else []

    def add_classifier(self, num_classes: int, pooling: Pooling | None = None) -> None:
        """A fresh classification head (for finetuning a pretrained LM on a classification task); `pooling`:
        last | mean (None: as the config says)."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes, pooling=pooling or self.config.pooling)
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

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token at context `seq_len` (default max_seq_len): for each weight-matrix entry 2 in
        the forward pass, 2 for its input's gradient and 2 for its own gradient when it trains (6 in all for full
        training: PaLM, appendix B; frozen weights, as under LoRA, take 4), plus attention scores."""
        c = self.config
        attention = 12 * c.num_layers * c.num_heads * c.head_size * (seq_len or c.max_seq_len)
        lookups = {id(m.weight) for m in (self.token_embedding, self.position_embedding) if m is not None}
        if c.tie_embeddings:  # the token embedding is also the LM head's matrix
            lookups.discard(id(self.token_embedding.weight))
        matmul = [p for p in self.parameters() if p.dim() == 2 and id(p) not in lookups]  # not norms, biases
        trained = sum(p.numel() for p in matmul if p.requires_grad)
        return 4 * sum(p.numel() for p in matmul) + 2 * trained + attention
