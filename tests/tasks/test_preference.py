"""task=preference: its record formats, bad records skipped and counted, and the exactness every task keeps
(accumulation equals one batch, resume is bitwise with the reference cache, 2 DDP processes equal 1)."""

import copy
import json
import random

import pytest
import torch
from conftest import WORDS, assert_resume_is_exact, lmtrain, write_jsonl

from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.cli import check
from lmtrain.commands import evaluate, finetune
from lmtrain.config import EvaluateConfig, FinetuneConfig
from lmtrain.config.choices import PreferenceLoss
from lmtrain.core.errors import UserError
from lmtrain.data import chat
from lmtrain.model.lora import add_lora
from lmtrain.tasks.base import TaskInfo
from lmtrain.tasks.preference import Preference
from lmtrain.tasks.registry import task_for
from lmtrain.train import preference
from lmtrain.train.optim import build_optimizer
from lmtrain.train.trainer import Trainer


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompts of two words; the chosen answer repeats the prompt's first word, the rejected one says 'blue'."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.sample(WORDS[:12], 2)
        records.append({"prompt": f"{a} {b}", "chosen": f"{a} {a}", "rejected": "blue log"})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    return {
        "train": write_jsonl(root / "train.jsonl", pairs(48)),
        "val": write_jsonl(root / "val.jsonl", pairs(16, seed=1)),
    }


def task_of(tiny_runs, instruction=True, max_seq_len=32) -> Preference:
    fields = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    if not instruction:
        del fields["prompt"]
    info = TaskInfo("preference", fields, instruction=instruction, decoding={"loss": "dpo", "beta": 0.1})
    model, tokenizer = load_model(str(tiny_runs["lm"]), torch.device("cpu"))
    task = task_for(info, tokenizer, max_seq_len, load_special_tokens(str(tiny_runs["lm"]), tokenizer))
    assert isinstance(task, Preference)
    return task


def answer_ids(example) -> list[int]:
    return [i for i, keep in zip(example.ids, example.loss_mask, strict=True) if keep]


def test_the_three_formats(tiny_runs):
    task = task_of(tiny_runs, max_seq_len=256)  # the chat template's text, a character a token
    enc = task.tokenizer.encode
    (pair,) = task.encode([{"prompt": "the cat", "chosen": "sat", "rejected": "ran"}], "data.train")
    prompt = enc("the cat").ids + [task.eot]
    assert pair.chosen.ids == prompt + enc("sat").ids + [task.eot]
    assert answer_ids(pair.chosen) == enc("sat").ids + [task.eot]
    assert answer_ids(pair.rejected) == enc("ran").ids + [task.eot]
    conversation = {
        "prompt": [{"role": "user", "content": "the cat"}],
        "chosen": [{"role": "assistant", "content": "sat"}],
        "rejected": [{"role": "assistant", "content": "ran"}],
    }
    (turns,) = task.encode([conversation], "data.train")
    ids, mask = chat.tokenize(
        task.tokenizer, task.chat_template, conversation["prompt"] + conversation["chosen"], task.chat_tokens
    )
    assert turns.chosen.ids == ids and answer_ids(turns.chosen) == [i for i, m in zip(ids, mask, strict=True) if m]
    implicit = task_of(tiny_runs, instruction=False, max_seq_len=256)
    full = {k: conversation["prompt"] + conversation[k] for k in ("chosen", "rejected")}
    (same,) = implicit.encode([full], "data.train")
    assert same.chosen.ids == turns.chosen.ids and same.rejected.loss_mask == turns.rejected.loss_mask
    (text,) = implicit.encode([{"chosen": "the cat sat", "rejected": "the cat ran"}], "data.train")
    assert text.chosen.ids == enc("the cat ").ids + [task.eot] + enc("sat").ids + [task.eot]
    assert answer_ids(text.rejected) == enc("ran").ids + [task.eot]


def test_bad_records_are_skipped_and_counted(tiny_runs):
    task = task_of(tiny_runs)
    records = [
        {"prompt": "the cat", "chosen": "sat", "rejected": "sat"},
        {"prompt": "the cat", "chosen": " ", "rejected": "ran"},
        {"prompt": "the cat " * 10, "chosen": "sat", "rejected": "ran"},
        {
            "prompt": [{"role": "robot", "content": "x"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {"prompt": "the", "chosen": "sat " * 20, "rejected": "ran"},  # kept, cut to fit
        {"prompt": "the cat", "chosen": "sat", "rejected": "ran"},
    ]
    examples = task.encode(records, "data.train")
    assert len(examples) == 2
    assert task.counts == {
        "skipped_train_identical_answers": 1,
        "skipped_train_empty_answer": 1,
        "skipped_train_prompt_too_long": 1,
        "skipped_train_bad_messages": 1,
    }
    cut = examples[0]
    assert len(cut.chosen.ids) == task.max_seq_len + 1 and cut.chosen.ids[:4] == cut.rejected.ids[:4]
    with pytest.raises(UserError, match=r"^data.validation: no usable preference pair \(all 2 skipped: 1 empty"):
        task.encode(records[:2], "data.validation")


def _trainer(tiny_runs, loss: PreferenceLoss) -> tuple[Trainer, Preference]:
    task = task_of(tiny_runs)
    model = load_model(str(tiny_runs["lm"]), torch.device("cpu"))[0]
    reference = preference.Reference(model=copy.deepcopy(model).eval().requires_grad_(False))
    objective = preference.PreferenceObjective(loss, preference.Settings(beta=0.5), reference, torch.device("cpu"))
    cfg = check("finetune", FinetuneConfig, ["init_from=x", "data.train=x", "optimizer=sgd", "optimizer.lr=0.5"])
    optimizer = build_optimizer(model, cfg.optimizer, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(model, optimizer, schedule, None, device=torch.device("cpu"), grad_clip=0, objective=objective), task


@pytest.mark.parametrize("loss", [PreferenceLoss.dpo, PreferenceLoss.orpo])
def test_accumulation_of_4_times_4_equals_one_batch_of_16(tiny_runs, loss):
    (one, task), (four, _) = _trainer(tiny_runs, loss), _trainer(tiny_runs, loss)
    examples = task.encode(pairs(16), "data.train")
    mean_one, _ = one.train_step([task.collate(examples)])
    mean_four, _ = four.train_step([task.collate(examples[i : i + 4]) for i in range(0, 16, 4)])
    assert mean_one.item() == pytest.approx(mean_four.item(), abs=1e-6)
    for a, b in zip(one.model.parameters(), four.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert one.objective.window_metrics(1) == pytest.approx(four.objective.window_metrics(1), rel=1e-6, abs=1e-6)


def test_lora_reference_is_the_base_model_with_adapters_off(tiny_runs):
    task = task_of(tiny_runs)
    model = load_model(str(tiny_runs["lm"]), torch.device("cpu"))[0]
    frozen = copy.deepcopy(model).eval()
    add_lora(model, ["all_linear"], 4, 8.0, 0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    batch = task.collate(task.encode(pairs(4), "data.train"))
    model.train()
    ours = preference.Reference(adapters=True).logps(lambda x, m: m(x), model, batch)
    theirs = preference.Reference(model=frozen).logps(lambda x, m: m(x), model, batch)
    assert model.training and torch.equal(ours, theirs)
    assert not torch.equal(ours, preference.Reference(model=model).logps(lambda x, m: m(x), model, batch))


def overrides(tiny_runs, data, *extra):
    return [
        f"init_from={tiny_runs['lm']}",
        f"data.train={data['train']}",
        f"data.validation={data['val']}",
        "task=preference",
        "epochs=null",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
        "trainer.log_every=1",
        "trainer.micro_batch_size=4",
        "optimizer.lr=3e-3",
        "scheduler.warmup_steps=1",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        *extra,
    ]


@pytest.mark.parametrize("reference", ["model", "precompute"])
def test_resume_is_bitwise(tiny_runs, data, tmp_path, monkeypatch, reference):
    def run(run_dir, *extra):
        cfg = check("finetune", FinetuneConfig, overrides(tiny_runs, data, f"task.reference={reference}", *extra))
        return finetune.run(cfg, str(run_dir))

    run(tmp_path / "straight")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped_train_identical_answers"] == 0
    assert "rewards/accuracies" in records[2] and "val_accuracy" in records[1]
    if reference == "precompute":
        assert (tmp_path / "straight" / "reference_logps.safetensors").is_file()
    assert_resume_is_exact(run, tmp_path, monkeypatch, kill_after=4, checkpoint_at="step_0000003")


def test_training_moves_the_preference_and_evaluate_reports_it(tiny_runs, data, tmp_path):
    cfg = check("finetune", FinetuneConfig, overrides(tiny_runs, data, "trainer.max_steps=12", "trainer.eval_every=12"))
    summary = finetune.run(cfg, str(tmp_path / "run"))
    assert summary["best_val_accuracy"] >= 0.9
    out = tmp_path / "eval"
    ckpt = summary["best_checkpoint"]
    evaluate.run(
        check("evaluate", EvaluateConfig, [f"ckpt={ckpt}", f"data.test={data['val']}", "device=cpu"]), str(out)
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["accuracy"] == summary["best_val_accuracy"] and result["margin"] > 0


def test_fsdp_and_packing_are_refused(tiny_runs, data, tmp_path):
    for extra, message in [
        ("trainer.strategy=fsdp", "trainer.strategy=fsdp: task=preference runs single-process or ddp"),
        ("data.packing=true", "data.packing: task=preference reads one whole sequence per example"),
    ]:
        with pytest.raises(UserError, match=message):
            finetune.run(check("finetune", FinetuneConfig, overrides(tiny_runs, data, extra)), str(tmp_path / extra))


def test_two_processes_equal_one_with_accumulation(tiny_runs, data, tmp_path):
    from safetensors.torch import load_file

    from lmtrain.train.sinks import read_metrics

    runs = {"one": ["grad_accum.steps=2"], "two": ["trainer.nproc=2", "trainer.strategy=ddp"]}
    for name, extra in runs.items():
        result = lmtrain("finetune", *overrides(tiny_runs, data, *extra), f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(str(tmp_path / n / "checkpoints" / "latest" / "model.safetensors")) for n in runs)
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-5)
    logs = [[r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in runs]
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_plan_counts_the_reference_model(tiny_runs, data):
    from lmtrain.commands.plan import build

    def memory(*extra):
        return build("finetune", check("finetune", FinetuneConfig, overrides(tiny_runs, data, *extra)), "cpu")["memory"]

    with_reference, precomputed, lora = memory(), memory("task.reference=precompute"), memory("adapter=lora")
    assert with_reference["reference"] == with_reference["weights"]  # an fp32 copy of the fp32 weights
    assert with_reference["total"] == precomputed["total"] + with_reference["reference"]
    assert "reference" not in precomputed and "reference" not in lora
    assert "reference" not in memory("task.loss=simpo")
