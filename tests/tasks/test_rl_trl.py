"""lmtrain's GRPO loss and gradients equal TRL's GRPOTrainer on the same model, completions and rewards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hf_models import build  # noqa: E402

from lmtrain.checkpoint.load import load_model  # noqa: E402
from lmtrain.train import grpo  # noqa: E402

CPU = torch.device("cpu")
PROMPT_LEN, COMPLETION_LEN, GROUP = 5, 6, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")


def _policy_logps(folder, sequences: torch.Tensor) -> torch.Tensor:
    """The completion tokens' log-probs under the HF model, [rows, COMPLETION_LEN]."""
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(folder)(sequences).logits[:, :-1]
    return grpo.token_logps(logits, sequences[:, 1:])[:, PROMPT_LEN - 1 :]


def _inputs(folder, beta: float, scale: bool):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 300, (2, PROMPT_LEN), generator=g).repeat_interleave(GROUP, 0)
    completions = torch.randint(3, 300, (2 * GROUP, COMPLETION_LEN), generator=g)
    lengths = torch.tensor([6, 2, 4, 5, 1, 6, 3, 6])
    mask = (torch.arange(COMPLETION_LEN)[None] < lengths[:, None]).long()
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 2.0, 1.0, 1.0]])
    advantages = grpo.group_advantages(rewards, scale).flatten()
    # the sampling policy near the current one (ratios in [0.74, 1.35]): some get clipped, some not
    policy = _policy_logps(folder, torch.cat([prompts, completions], dim=1))
    old = policy + torch.rand(2 * GROUP, COMPLETION_LEN, generator=g) * 0.6 - 0.3
    ref = policy + torch.rand(2 * GROUP, COMPLETION_LEN, generator=g) * 1.0 - 0.5
    inputs = {
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions,
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    return inputs, rewards


def _trl_loss_and_grad(folder, tmp_path, inputs, loss_type, beta, scale, temperature):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2 * GROUP,
        num_generations=GROUP,
        max_completion_length=COMPLETION_LEN,
        beta=beta,
        loss_type=loss_type,
        scale_rewards="group" if scale else "none",
        temperature=temperature,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's default autocasts to bf16; lmtrain's run here is fp32
    )
    dataset = datasets.Dataset.from_dict({"prompt": ["a b"] * 8})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return float(loss), trainer.model.get_input_embeddings().weight.grad.clone()


def _lmtrain_loss_and_grad(folder, inputs, sequence_norm, beta, temperature):
    model, _ = load_model(str(folder), CPU)
    model.train()
    sequences = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.zeros(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.bool)
    mask[:, PROMPT_LEN - 1 :] = inputs["completion_mask"].bool()
    pad = torch.zeros(sequences.shape[0], PROMPT_LEN - 1)
    t = {
        "targets": sequences[:, 1:],
        "mask": mask,
        "advantages": inputs["advantages"],
        "old": torch.cat([pad, inputs["old_per_token_logps"]], dim=1),
    }
    if beta:
        t["ref"] = torch.cat([pad, inputs["ref_per_token_logps"]], dim=1)
    settings = grpo.Settings(kl_beta=beta, temperature=temperature, sequence_norm=sequence_norm)
    objective = grpo.GRPOObjective(settings, CPU)
    batch = (sequences[:, :-1], t)
    loss = objective.loss(SimpleNamespace(forward=model), batch) / objective.count(batch)
    loss.backward()
    return float(loss), model.token_embedding.weight.grad.clone()


@pytest.mark.parametrize(
    ("loss_type", "sequence_norm", "beta", "scale", "temperature"),
    [("dapo", False, 0.0, False, 1.0), ("grpo", True, 0.04, True, 0.7), ("dapo", False, 0.1, True, 1.0)],
)
def test_loss_and_gradients_equal_trl(folder, tmp_path, loss_type, sequence_norm, beta, scale, temperature):
    inputs, _ = _inputs(folder, beta, scale)
    expected_loss, expected_grad = _trl_loss_and_grad(folder, tmp_path, inputs, loss_type, beta, scale, temperature)
    loss, grad = _lmtrain_loss_and_grad(folder, inputs, sequence_norm, beta, temperature)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert expected_grad.abs().max() > 1e-3  # the comparison below compares something
    assert torch.allclose(grad, expected_grad, atol=1e-5, rtol=0)


def test_advantages_equal_trl():
    """TRL's advantages: reward minus the group mean, over (Bessel-corrected std + 1e-4) with scale_rewards."""
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [3.0, 3.0, 3.0, 3.0]])
    from trl.trainer.utils import nanstd

    std = nanstd(rewards, dim=1).unsqueeze(1)
    centred = rewards - rewards.mean(1, keepdim=True)
    assert torch.allclose(grpo.group_advantages(rewards, True), centred / (std + 1e-4))
    assert torch.equal(grpo.group_advantages(rewards, False), centred)
