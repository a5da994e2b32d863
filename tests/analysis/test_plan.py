"""`lmtrain plan`: its counts are the built model's, its memory estimate is near the measured peak."""

import dataclasses
import json

import pytest
import torch
from conftest import compose, lmtrain

from lmtrain.analysis import costs
from lmtrain.checkpoint.load import load_model
from lmtrain.commands.plan import build
from lmtrain.config import FinetuneConfig, OptimizerConfig
from lmtrain.config.choices import OptimizerName
from lmtrain.config.compose import check, group_options
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train.optim import MEMORY_PER_PARAMETER


@pytest.mark.parametrize("preset", group_options("model"))
def test_parameters_and_flops_are_the_built_models(preset):
    cfg = compose(f"model={preset}", "data.tokenizer=byte", "trainer.device=cpu")
    plan = build("pretrain", cfg, "cpu")
    with torch.device("meta"):  # shapes only: the same counts as on a device, for presets of any size
        model = TransformerLM(TransformerConfig(vocab_size=257, **dataclasses.asdict(cfg.model)))
    p = plan["parameters"]
    assert p["total"] == model.num_parameters() == p["trainable"]
    embeddings = model.token_embedding.weight.numel() + (
        model.position_embedding.weight.numel() if model.position_embedding is not None else 0
    )
    assert p["embedding"] == embeddings and p["non_embedding"] == p["total"] - embeddings
    # the trainer's accounting (model.flops_per_token) times the tokens of a step and of the run
    assert plan["flops"]["per_token"] == model.flops_per_token()
    tokens = cfg.trainer.micro_batch_size * cfg.model.max_seq_len * cfg.grad_accum.steps
    assert plan["flops"]["per_step"] == model.flops_per_token() * tokens
    assert plan["tokens"]["per_run"] == tokens * cfg.trainer.max_steps


def test_finetune_plan_counts_frozen_and_new_parameters(tmp_path, tiny_checkpoint):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the cat {i}", "label": i % 2}) + "\n" for i in range(40)))
    overrides = [f"init_from={tiny_checkpoint}", f"data.train={train}", "task=classification", "freeze_blocks=1"]
    plan = build("finetune", check("finetune", FinetuneConfig, [*overrides, "trainer.device=cpu"]), "cpu")
    model, _ = load_model(str(tiny_checkpoint), torch.device("cpu"))
    model.add_classifier(2)
    model.freeze(first_blocks=1)
    assert plan["parameters"]["total"] == model.num_parameters()
    assert plan["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan["parameters"]["trainable"] < plan["parameters"]["total"]


def test_finetune_plan_uses_the_capped_steps_and_the_examples_lengths(tmp_path, tiny_checkpoint):
    """epochs=50 capped by trainer.max_steps=3 is 3 steps; attention runs over the examples' own lengths (a
    token of an n-token example attends over n), not over the model's whole context."""
    records = [{"text": "the cat " * n, "label": int(n > 2)} for n in (1, 2, 3) * 10]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = [f"init_from={tiny_checkpoint}", f"data.train={train}", "task=classification"]
    overrides.append(f"data.validation={train}")  # every example trains
    cfg = check("finetune", FinetuneConfig, [*overrides, "epochs=50", "trainer.max_steps=3", "trainer.device=cpu"])
    plan = build("finetune", cfg, "cpu")
    assert plan["tokens"]["max_steps"] == 3
    model, tokenizer = load_model(str(tiny_checkpoint), torch.device("cpu"))
    lengths = [len(tokenizer.encode(r["text"]).ids) + 1 for r in records]  # + the end-of-text classified at
    assert plan["flops"]["attention_len"] == round(sum(n * n for n in lengths) / sum(lengths))
    assert plan["flops"]["attention_len"] < model.config.max_seq_len
    model.add_classifier(2)
    assert plan["flops"]["per_token"] == model.flops_per_token(plan["flops"]["attention_len"])


def test_finetune_plan_counts_only_the_examples_finetune_trains_on(tmp_path, tiny_checkpoint):
    """Without data.validation, finetune holds data.val_fraction of train out: the plan derives its defaults
    and counts its steps from the 45 of 50 examples that train (3 steps per epoch of 16), not from all 50."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the cat {i}", "label": i % 2}) + "\n" for i in range(50)))
    overrides = [f"init_from={tiny_checkpoint}", f"data.train={train}", "task=classification", "trainer.device=cpu"]
    plan = build("finetune", check("finetune", FinetuneConfig, overrides), "cpu")
    assert plan["tokens"]["max_steps"] == costs.finetune_steps(45, 16, 1, 1, 20.0) == 60


def test_too_big_a_batch_gets_the_largest_micro_batch_that_fits():
    cfg = compose("model=gpt2_124m", "trainer=gpu", "trainer.micro_batch_size=256", "data.tokenizer=byte")
    plan = build("pretrain", cfg, "l4")
    memory = plan["memory"]
    assert not memory["fits"] and memory["device_bytes"] == 24e9
    best = memory["largest_micro_batch"]
    assert 0 < best < 256

    def total(batch: int) -> int:
        shape = costs.ModelShape(257, 768, 12, 12, 1024, 3072, "gelu", "learned", 0.0, 768, 768)
        params = plan["parameters"]["total"]
        return costs.memory_estimate(
            shape,
            total_params=params,
            trainable_params=params,
            linear_weights=params - 1024 * 768,
            micro_batch=batch,
            seq_len=1024,
            precision="bf16",
            optimizer_bytes=MEMORY_PER_PARAMETER[OptimizerName.adamw](OptimizerConfig()),
        )["total"]

    assert total(best) <= 24e9 < total(best + 1)


# Three configs from 0.12M to 3.2M parameters (27x), each with a peak of tens of MB, so RSS noise stays small.
MEASURED = [
    ["model=tiny", "model.max_seq_len=128", "trainer.micro_batch_size=24"],
    ["model=tiny", "model.d_model=128", "model.num_layers=4", "model.max_seq_len=128", "trainer.micro_batch_size=12"],
    ["model=small", "trainer.micro_batch_size=6"],
]


@pytest.mark.parametrize("overrides", MEASURED, ids=["0.12M", "0.8M", "3.2M"])
def test_memory_estimate_is_within_25_percent_of_the_measured_peak(overrides):
    # a fresh process each: the peak RSS of one measurement must not hold another's memory
    result = lmtrain(
        "plan", *overrides, "data.tokenizer=byte", "trainer.device=cpu", "--measure", "--steps=2", "--format=json"
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    estimate, measured = plan["memory"]["total"], plan["measured"]["peak_memory"]
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)
    assert plan["measured"]["tokens_per_s"] > 0


def test_plan_errors_are_one_line():
    result = lmtrain("plan", "model.d_modle=64")
    assert result.returncode == 2
    assert result.stderr.strip() == "lmtrain plan: error: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"
    result = lmtrain("plan", "model=tiny", "data.tokenizer=byte", "--device", "x100")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("lmtrain plan: error: --device: unknown device 'x100'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_finetune_plan_counts_lora_adapters(tmp_path, tiny_checkpoint):
    from lmtrain.model.lora import add_lora

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the cat {i}", "label": i % 2}) + "\n" for i in range(40)))
    overrides = [f"init_from={tiny_checkpoint}", f"data.train={train}", "task=classification", "adapter=lora"]
    plan = build(
        "finetune", check("finetune", FinetuneConfig, [*overrides, "adapter.rank=4", "trainer.device=cpu"]), "cpu"
    )
    model, _ = load_model(str(tiny_checkpoint), torch.device("cpu"))
    model.add_classifier(2)
    add_lora(model, ["all_linear"], rank=4, alpha=32.0, dropout=0.0)
    model.classifier.requires_grad_(True)
    assert plan["parameters"]["total"] == model.num_parameters()
    assert plan["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
