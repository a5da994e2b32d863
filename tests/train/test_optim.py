import json
import math

import pytest
import torch

from lmtrain.config import OptimizerConfig, SchedulerConfig
from lmtrain.config.choices import OptimizerName, SchedulerName
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train.optim import build_optimizer, parameter_groups
from lmtrain.train.schedules import build_scheduler, lr_at, resume_schedule

LR, MIN, WARM, MAX = 1e-3, 1e-4, 10, 110
CPU = torch.device("cpu")


def schedule(name, **kw) -> SchedulerConfig:
    return SchedulerConfig(name=SchedulerName(name), warmup_steps=WARM, min_lr=MIN, **kw)


def at(name, step, max_steps=MAX):
    return lr_at(step, schedule(name), LR, max_steps)


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
    sched = build_scheduler(opt, schedule("cosine"), LR, MAX)
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
    opt = build_optimizer(model, OptimizerConfig(name=OptimizerName(name), lr=0.1, betas=[0.9, 0.99]), CPU)
    assert len(opt.param_groups) == 2


def muon_setup(**config):
    model = TransformerLM(
        TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=2, tie_embeddings=False, **config)
    )
    model.add_classifier(3)
    opt = build_optimizer(model, OptimizerConfig(name=OptimizerName.muon, lr=1e-3, momentum=0.95, muon_lr=0.02), CPU)
    return model, opt


def muon_step(model, opt, seed):
    torch.manual_seed(seed)
    tokens = torch.randint(0, 20, (2, 8))
    lm = model(tokens).square().mean()
    cls = model(tokens, last_positions=torch.tensor([7, 3])).square().mean()
    (lm + cls).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_muon_updates_the_block_matrices_and_adamw_the_rest():
    model, opt = muon_setup(bias=True, qk_norm=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group = opt.param_groups[-1]
    assert muon_group["lr"] == 0.02 and "ns_steps" in muon_group
    muon_names = {names[id(p)] for p in muon_group["params"]}
    assert muon_names == {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "ffn.up", "ffn.down")
    }
    adamw_names = {names[id(p)] for g in opt.param_groups[:-1] for p in g["params"]}
    assert adamw_names == set(names.values()) - muon_names  # embeddings, heads, norms, q/k norms, biases
    assert {"token_embedding.weight", "lm_head.weight", "classifier.weight", "classifier.bias"} <= adamw_names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    muon_step(model, opt, 0)
    for name, param in model.named_parameters():
        state = opt.state[param]
        assert set(state) == ({"momentum_buffer"} if name in muon_names else {"step", "exp_avg", "exp_avg_sq"}), name
        if name.endswith((".weight", ".bias")) and "norm" not in name:
            assert not torch.equal(before[name], param), f"{name} was not updated"


def test_muon_state_round_trips_through_the_checkpoint_format_bitwise():
    from lmtrain.checkpoint.files import _join_optimizer_state, _split_optimizer_state

    model, opt = muon_setup()
    for seed in range(2):
        muon_step(model, opt, seed)
    tensors, meta = _split_optimizer_state(opt.state_dict())
    # as optimizer.safetensors and optimizer.json store them: copies, tuples as lists
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta = json.loads(json.dumps(meta))
    copy, copy_opt = muon_setup()
    copy.load_state_dict(model.state_dict())
    copy_opt.load_state_dict(_join_optimizer_state(tensors, meta))
    assert copy_opt.muon.state is copy_opt.state and copy_opt.muon.param_groups[0] is copy_opt.param_groups[-1]
    for seed in (2, 3):
        muon_step(model, opt, seed)
        muon_step(copy, copy_opt, seed)
    for (name, a), b in zip(model.state_dict().items(), copy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_schedule_scales_muon_and_adamw_alike():
    model, opt = muon_setup()
    sched = build_scheduler(opt, schedule("cosine"), 1e-3, MAX)
    for step in range(WARM + 30):
        factor = at("cosine", step) / LR
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
        assert opt.param_groups[-1]["lr"] == pytest.approx(0.02 * factor)
        opt.step()
        sched.step()


def test_resume_schedule_sets_the_next_steps_lr_under_the_new_schedule():
    """A run resumed with a longer max_steps continues on the new schedule: its next LR is lr_at(step) of the
    new length, not the saved one's, and the scheduler reports it too."""
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1))

    def scheduled(max_steps):
        opt = build_optimizer(model, OptimizerConfig(lr=LR), CPU)
        return build_scheduler(opt, schedule("cosine"), LR, max_steps)

    saved = scheduled(MAX)
    for _ in range(40):
        saved.optimizer.step()
        saved.step()
    resumed = scheduled(2 * MAX)
    resume_schedule(resumed, saved.state_dict())
    expected = at("cosine", 40, max_steps=2 * MAX)
    assert expected != pytest.approx(at("cosine", 40))  # the two schedules differ at this step
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([expected, expected])
    assert resumed.get_last_lr() == pytest.approx([expected, expected])
    assert resumed.last_epoch == 40
