import math

import pytest
import torch

from lmtrain.model import TransformerConfig, TransformerLM
from lmtrain.optim import build_optimizer, build_scheduler, lr_at, parameter_groups

LR, MIN, WARM, MAX = 1e-3, 1e-4, 10, 110


def at(name, step, **kw):
    return lr_at(step, name=name, lr=LR, warmup_steps=WARM, max_steps=MAX, min_lr=MIN, **kw)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "inverse_sqrt", "wsd"])
def test_warmup_is_linear_and_reaches_peak(name):
    assert at(name, 0) == pytest.approx(LR / (WARM + 1))
    assert at(name, 4) == pytest.approx(LR * 5 / (WARM + 1))
    assert at(name, WARM) == pytest.approx(LR)


def test_cosine_key_steps():
    assert at("cosine", WARM + 50) == pytest.approx(MIN + 0.5 * (LR - MIN))
    assert at("cosine", MAX) == pytest.approx(MIN)
    assert at("cosine", MAX + 100) == pytest.approx(MIN)


def test_linear_key_steps():
    assert at("linear", WARM + 50) == pytest.approx((LR + MIN) / 2)
    assert at("linear", MAX) == pytest.approx(MIN)


def test_constant_stays():
    assert at("constant", MAX) == LR


def test_inverse_sqrt_key_steps():
    assert at("inverse_sqrt", 4 * WARM) == pytest.approx(LR / 2)
    assert at("inverse_sqrt", 10_000) == pytest.approx(MIN)  # floored


def test_wsd_key_steps():
    # decay over the last 20% of 110 steps: from step 88 to 110
    assert at("wsd", 87) == LR
    assert at("wsd", 88) == LR
    assert at("wsd", 99) == pytest.approx(LR - (LR - MIN) * 11 / 22)
    assert at("wsd", MAX) == pytest.approx(MIN)


def test_scheduler_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=LR)
    sched = build_scheduler(opt, name="cosine", lr=LR, warmup_steps=WARM, max_steps=MAX, min_lr=MIN)
    seen = []
    for _ in range(MAX + 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([at("cosine", s) for s in range(MAX + 1)])
    assert math.isclose(seen[-1], MIN)


def test_no_decay_on_norms_biases_embeddings():
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1, bias=True))
    decay, keep = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.ffn.up.weight",
        "blocks.0.ffn.down.weight",
    }
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_build_optimizer(name):
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1))
    opt = build_optimizer(
        model,
        name=name,
        lr=0.1,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        eps=1e-8,
        momentum=0.9,
        device=torch.device("cpu"),
    )
    assert len(opt.param_groups) == 2
