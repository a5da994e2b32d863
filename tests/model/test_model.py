import pytest
import torch

from lmtrain.model.generate import filter_logits, generate
from lmtrain.model.transformer import KVCache, TransformerConfig, TransformerLM

VARIANTS = [
    {},
    {"position": "rope", "activation": "swiglu", "tie_embeddings": False},
    {"norm_position": "post", "activation": "relu", "bias": True},
    {"position": "rope", "activation": "relu2", "qk_norm": True, "logit_softcap": 5.0},
]


def tiny(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        TransformerConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2, max_seq_len=16, **overrides)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_is_causal(variant):
    model = tiny(**variant).eval()
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 12, 50)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant):
    model = tiny(**variant).eval()
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, torch.device("cpu"), torch.float32)
        prefix = model(tokens[:, :6], cache)
        steps = [model(tokens[:, i : i + 1], cache) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-4, atol=1e-5)


def test_tied_head_shares_the_embedding():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.num_parameters() == tied.num_parameters() + 50 * 32


def test_flops_per_token_counts_matmuls_and_attention():
    model = tiny()
    c = model.config
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2) - c.max_seq_len * c.d_model  # positions
    assert model.flops_per_token() == 6 * matrices + 12 * c.num_layers * c.d_model * c.max_seq_len


@pytest.mark.parametrize("lora", [False, True])
def test_flops_per_token_equals_torch_flop_count_of_a_training_step(lora):
    # what torch counts in one forward and backward, matmuls and attention alike; frozen weights (LoRA's base)
    # get no weight gradient, so they count 4 per token instead of 6
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lmtrain.model.lora import add_lora

    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=8, max_seq_len=16))
    if lora:
        add_lora(model, ["all_linear"], rank=4, alpha=8.0, dropout=0.0)
    tokens = torch.randint(0, 50, (2, 16))
    # the math kernel: attention as matmuls torch counts (the fused CPU kernel has no FLOP formula)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).sum().backward()
    # with LoRA the first block's frozen matmuls need no input gradient either (nothing below them trains)
    assert counter.get_total_flops() / tokens.numel() == pytest.approx(model.flops_per_token(16), rel=0.02)


def test_residual_projections_get_scaled_init():
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=256, num_heads=4, num_layers=8, max_seq_len=16))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert std == pytest.approx(0.02 / 4, rel=0.1)


def test_relu2_and_logit_softcap_follow_their_formulas():
    model = tiny(activation="relu2", logit_softcap=2.0)
    ffn, x = model.blocks[0].ffn, torch.randn(3, 32)
    assert torch.equal(ffn(x), ffn.down(torch.relu(ffn.up(x)) ** 2))
    tokens = torch.randint(0, 50, (2, 16))
    hidden = model.hidden_states(tokens)
    logits = model(tokens)
    torch.testing.assert_close(logits, 2.0 * torch.tanh(model.lm_head(hidden) / 2.0), rtol=0, atol=0)
    assert logits.abs().max() < 2.0
    model.lm_head.weight.data.mul_(1000)  # large logits stay inside (-cap, cap)
    assert model(tokens).abs().max() <= 2.0


def test_zero_init_residual_starts_every_block_as_the_identity():
    model = tiny(zero_init_residual=True, position="rope", norm="rmsnorm")
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.ffn.down.weight.any()
        assert block.ffn.up.weight.std() > 0.01  # the other matrices keep their normal init
    x = torch.randn(2, 16, 32)
    rope = (model.rope_cos[:16], model.rope_sin[:16])
    assert torch.equal(model.blocks[0](x, rope), x)


def test_mean_pooling_averages_the_real_tokens_only():
    model = tiny()
    model.add_classifier(3, pooling="mean")
    tokens = torch.randint(0, 50, (2, 16))
    last = torch.tensor([15, 4])
    hidden = model.hidden_states(tokens)
    expected = model.classifier(torch.stack([hidden[0].mean(0), hidden[1, :5].mean(0)]))
    torch.testing.assert_close(model(tokens, last_positions=last), expected)
    padded = tokens.clone()
    padded[1, 5:] = 0  # what follows the last real token does not matter
    torch.testing.assert_close(model(padded, last_positions=last)[1], expected[1])


def test_cached_greedy_generation_equals_recomputing_every_step():
    model = tiny(position="rope").eval()
    prompt = torch.randint(0, 50, (2, 4))
    cached = generate(model, prompt, 10, temperature=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(10):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, tokens)


def test_generate_runs_past_the_context_and_greedy_is_deterministic():
    model = tiny()
    prompt = torch.randint(0, 50, (1, 5))
    a = generate(model, prompt, 30, temperature=0)
    b = generate(model, prompt, 30, temperature=0)
    assert a.shape == (1, 35) and torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    sampled = generate(model, prompt, 30, temperature=1.0, top_k=5, top_p=0.9, generator=g)
    assert sampled.shape == (1, 35)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.5)).tolist() == [[False, True, True, True]]


def test_freeze_embeddings_and_first_blocks():
    model = tiny(tie_embeddings=False)
    model.add_classifier(3)
    model.freeze(embeddings=True, first_blocks=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "token_embedding.weight" in frozen and "position_embedding.weight" in frozen
    assert all(n in frozen for n, _ in model.blocks[0].named_parameters(prefix="blocks.0"))
    assert not any(n.startswith(("blocks.1", "classifier", "lm_head")) for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(torch.randint(0, 50, (2, 8)), last_positions=torch.tensor([7, 3]))
    assert logits.shape == (2, 3)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    logits.sum().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]), name
        elif name.startswith(("blocks.1", "classifier")):  # the LM head gets no gradient from class logits
            assert not torch.equal(param, before[name]), name


def test_activation_checkpointing_gives_the_same_gradients():
    tokens = torch.randint(0, 50, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = tiny(position="rope")
        model.activation_checkpointing = checkpointing
        model(tokens).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
