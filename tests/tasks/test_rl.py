"""task=rl: rewards, exact accumulation over micro-batches, bitwise resume, one-line reward errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_resume_is_exact, write_jsonl

from lmtrain.cli import check
from lmtrain.commands import finetune
from lmtrain.config import FinetuneConfig, OptimizerConfig, SchedulerConfig
from lmtrain.core.errors import UserError
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.tasks import rewards
from lmtrain.tasks.rollouts import Prompt, collate
from lmtrain.train import grpo
from lmtrain.train.optim import build_optimizer
from lmtrain.train.schedules import build_scheduler
from lmtrain.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("how", "text", "expected"),
    [
        ("none", "  42 \n", "42"),
        ("last_number", "3 apples and 1,234.5 pears", "1234.5"),
        ("last_number", "no digits", None),
        ("boxed", "so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}"),
        ("regex", "Answer: seven.", "seven"),
    ],
)
def test_extraction(how, text, expected):
    assert rewards.extract(text, how, r"Answer: (\w+)") == expected


def test_builtin_rewards():
    settings = {"extract": "last_number", "answer_field": "answer", "format_pattern": r"^\d+$"}
    fns = rewards.resolve(["exact_match", "format", "regex", "length"], settings)
    record = {"answer": 7}
    assert fns["exact_match"](None, "it is 7.0", record) == 1.0
    assert fns["exact_match"](None, "it is 8", record) == 0.0
    assert fns["format"](None, "12", record) == 1.0 and fns["format"](None, "x12", record) == 0.0
    assert fns["regex"](None, "12", record) == 1.0 and fns["regex"](None, "x12", record) == 0.0
    assert fns["length"](None, "x" * 50, record) == -0.5


def test_a_failing_reward_is_one_line_naming_it_and_the_record():
    def broken(prompt, completion, record):
        return {"not": "a number"} if completion else 1 / 0

    with pytest.raises(UserError, match=r"^task.reward mine raised ZeroDivisionError: .* on data.train record 3$"):
        rewards.score("mine", broken, "p", "", {}, "data.train record 3")
    with pytest.raises(UserError, match=r"returned \{'not': 'a number'\}, not a finite number, on data.train record 3"):
        rewards.score("mine", broken, "p", "x", {}, "data.train record 3")
    with pytest.raises(UserError, match="returned nan"):
        rewards.score("mine", lambda *a: float("nan"), "p", "x", {}, "data.train record 3")


def _rollout_batch(rows: slice, advantages: torch.Tensor):
    prompts = [Prompt([1, 2, 3]), Prompt([4, 5])]
    completions = [[6, 7, 0], [8], [9, 9, 9, 0], [3, 0], [5, 6], [7, 8, 9]]
    n = 3
    first = rows.start // n
    return collate(prompts[first : first + (rows.stop - rows.start) // n], completions[rows], advantages[rows], 0)


@pytest.mark.parametrize("sequence_norm", [False, True])
def test_accumulation_is_exact(sequence_norm):
    """One step over a micro-batch of two groups updates the weights as two micro-batches of one group each."""
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.3, -0.6])
    trained = []
    for parts in ([slice(0, 6)], [slice(0, 3), slice(3, 6)]):
        torch.manual_seed(0)
        model = TransformerLM(TransformerConfig(vocab_size=12, d_model=16, num_heads=2, num_layers=1, max_seq_len=16))
        opt = build_optimizer(model, OptimizerConfig(lr=1e-2, momentum=0.0), CPU)
        sched = build_scheduler(opt, SchedulerConfig(warmup_steps=0), 1e-2, 10)
        objective = grpo.GRPOObjective(grpo.Settings(sequence_norm=sequence_norm, kl_beta=0.1), CPU)
        trainer = Trainer(model, opt, sched, None, device=CPU, objective=objective)  # type: ignore[arg-type]
        initial = [p.detach().clone() for p in model.parameters()]
        batches = [_rollout_batch(rows, advantages) for rows in parts]
        for _, t in batches:  # a reference away from the policy, so the KL term has a gradient
            t["ref"] = torch.full(t["targets"].shape, -2.0)
        trainer.train_step(batches)
        trained.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*trained, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    assert any(not torch.equal(a, b) for a, b in zip(trained[0], initial, strict=True))  # the step moved them


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    words = "the cat dog sat ran on mat log".split()
    records = [{"prompt": f"{a} {b}", "answer": b} for a in words for b in words]
    return write_jsonl(root / "train.jsonl", records)


def _rl_run(run_dir, base, train, *extra):
    overrides = [
        f"init_from={base}",
        "task=rl",
        f"data.train={train}",
        "task.group_size=3",
        "task.max_new_tokens=4",
        "task.max_eval_examples=4",
        "epochs=null",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=2",
        "trainer.log_every=1",
        "trainer.micro_batch_size=2",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        *extra,
    ]
    return finetune.run(check("finetune", FinetuneConfig, overrides), str(run_dir))


def test_resume_is_bitwise_and_samples_the_same_completions(tmp_path, tiny_checkpoint, prompts, monkeypatch):
    """Killed after step 3 and resumed from step 2: the same weights and the same metrics (rewards of the same
    completions), timings aside."""
    extra = ("task.reward=[length,exact_match]", "task.reward_weights=[1.0,0.5]", "task.kl_beta=0.05")
    run = lambda run_dir, *more: _rl_run(run_dir, tiny_checkpoint, prompts, *extra, *more)  # noqa: E731
    run(tmp_path / "straight")
    timing = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}  # noqa: E731
    import conftest

    real = conftest.without_speed
    monkeypatch.setattr(conftest, "without_speed", lambda d: [timing(r) for r in real(d)])
    assert_resume_is_exact(run, tmp_path, monkeypatch, kill_after=3, checkpoint_at="step_0000002")


def test_user_reward_loads_only_when_named_and_its_error_is_one_line(tmp_path, tiny_checkpoint, prompts):
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').close()\n\ndef score(prompt, completion, record):\n    return record['nope']\n"
    (tmp_path / "my_rewards.py").write_text(code)
    _rl_run(tmp_path / "builtin", tiny_checkpoint, prompts, "trainer.max_steps=1")
    assert not marker.exists()
    reward = f"task.reward=python:{tmp_path / 'my_rewards.py'}:score"
    with pytest.raises(
        UserError, match=r"^task.reward python:.*:score raised KeyError: 'nope' on data.train record \d+$"
    ):
        _rl_run(tmp_path / "user", tiny_checkpoint, prompts, reward)
    assert marker.exists()


@pytest.mark.parametrize("task_name", ["rl", "preference"])
def test_generate_frames_the_prompt_as_the_training_prompts_were_framed(task_name):
    """A task trained on conversational prompts renders `generate`'s prompt as a user turn in the chat
    template (as training did); one trained on text prompts frames it as text then EOT."""
    from chat_templates import CHATML, chat_tokenizer

    from lmtrain.config import TaskConfig
    from lmtrain.tasks.registry import task_class

    tokenizer = chat_tokenizer(["<|im_end|>", "<|endoftext|>", "<|im_start|>"], [])
    eot = tokenizer.token_to_id("<|im_end|>")
    fields = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    turn = [{"role": "user", "content": "the cat"}]
    conversational = {"prompt": turn, "chosen": [{"role": "assistant", "content": "a"}], "answer": "a"}
    conversational["rejected"] = [{"role": "assistant", "content": "b"}]
    text = {"prompt": "the cat", "chosen": "a", "rejected": "b", "answer": "a"}
    kind = task_class(task_name)
    for record, chat_framed in ((conversational, True), (text, False)):
        info = kind.build_info(TaskConfig(name=task_name), fields, [record])
        task = kind(info, tokenizer, 64, eot, CHATML)
        ids = task.user_prompt_ids("the cat", None, None)
        if chat_framed:
            assert ids == task.chats.encode([turn], add_generation_prompt=True)[0][0]
            assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        else:
            assert ids == tokenizer.encode("the cat", add_special_tokens=False).ids + [eot]
