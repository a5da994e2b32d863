"""Finetuning from a tiny pretrained checkpoint made here: each task learns a generated rule."""

import json
import random

import pytest
import torch
import yaml
from conftest import lmtrain
from safetensors.torch import load_file

from lmtrain.checkpoint.load import load_model
from lmtrain.cli import check
from lmtrain.commands import finetune, pretrain
from lmtrain.config import FinetuneConfig, PretrainConfig
from lmtrain.core.errors import UserError
from lmtrain.train.sinks import read_metrics

NOUNS = "cat dog mat log sun moon tree bird fish".split()
COLORS = "red blue green black white".split()
SIZES = "big small tall short long".split()
WORDS = NOUNS + COLORS + SIZES
FRENCH = dict(
    zip(
        WORDS,
        "chat chien tapis bois soleil lune arbre oiseau poisson rouge bleu vert noir blanc grand "
        "petit haut court long".split(),
        strict=True,
    )
)


def qa_record(rng):
    a, b = rng.sample(NOUNS, 2)
    color, size = rng.choice(COLORS), rng.choice(SIZES)
    facts = [f"the {a} is {color}.", f"the {b} is {size}."]
    rng.shuffle(facts)
    question, answer = (f"what color is the {a}?", color) if rng.random() < 0.5 else (f"what size is the {b}?", size)
    return {"context": " ".join(facts), "question": question, "answer": answer}


def seq2seq_record(rng):
    words = [rng.choice(WORDS) for _ in range(4)]
    return {"en": " ".join(words), "fr": " ".join(FRENCH[w] for w in words)}


def classification_record(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    return {"text": " ".join(words), "label": "pos" if "red" in words else "neg"}  # needs the text


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    files = {}
    for name, make in (("qa", qa_record), ("seq2seq", seq2seq_record), ("classification", classification_record)):
        files[name] = (
            write(root / f"{name}_train.jsonl", [make(rng) for _ in range(1200)]),
            write(root / f"{name}_val.jsonl", [make(rng) for _ in range(100)]),
        )
    lines = []
    for _ in range(600):
        r = qa_record(rng)
        lines.append(f"{r['context']} {r['question']} {r['answer']}")
        r = seq2seq_record(rng)
        lines.append(f"{r['en']} = {r['fr']}")
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    files["root"] = root
    return files


@pytest.fixture(scope="module")
def base(data):
    """A tiny byte-level RoPE LM pretrained on text of the same kind (~10 s)."""
    run_dir = data["root"] / "pretrained"
    cfg = check(
        "pretrain",
        PretrainConfig,
        [
            "model=tiny",
            "model.d_model=128",
            "model.num_heads=4",
            "model.position=rope",
            "data.tokenizer=byte",
            f"data.train={data['root'] / 'corpus.txt'}",
            "trainer.max_steps=300",
            "trainer.eval_every=300",
            "trainer.checkpoint_every=300",
            "scheduler.warmup_steps=10",
            "optimizer.lr=3e-3",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
        ],
    )
    pretrain.run(cfg, str(run_dir))
    return run_dir / "checkpoints" / "latest"


def finetune_run(run_dir, base, task, train, val, *extra):
    cfg = check(
        "finetune",
        FinetuneConfig,
        [
            f"init_from={base}",
            f"task={task}",
            f"data.train={train}",
            f"data.validation={val}",
            "epochs=6",
            "evals_per_epoch=1",
            "optimizer.lr=2e-3",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            *extra,
        ],
    )
    return finetune.run(cfg, str(run_dir))


def best_validation(run_dir, metric):
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if f"val_{metric}" in r and r["step"] > 0]
    return max(r[f"val_{metric}"] for r in records)


def test_classification_learns_a_rule_in_the_text(tmp_path, data, base):
    summary = finetune_run(tmp_path, base, "classification", *data["classification"], "epochs=3")
    assert summary["best_val_accuracy"] >= 0.95
    assert (tmp_path / "checkpoints" / "best" / "task.json").is_file()
    task = json.loads((tmp_path / "checkpoints" / "best" / "task.json").read_text())
    assert task["labels"] == ["neg", "pos"]

    # the finetuned classifier teaches a fresh student through its class logits
    student = finetune_run(
        tmp_path / "student",
        base,
        "classification",
        *data["classification"],
        "epochs=3",
        "loss=distill",
        f"loss.teacher={tmp_path}/checkpoints/best",
        "loss.alpha=0.7",
    )
    assert student["best_val_accuracy"] >= 0.9

    out = lmtrain(
        "evaluate",
        f"ckpt={tmp_path}/checkpoints/best",
        "split=validation",
        f"data.validation={data['classification'][1]}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert set(report["per_class"]) == {"neg", "pos"}
    assert {"precision", "recall", "f1", "support"} <= set(report["per_class"]["pos"])

    out = lmtrain("predict", f"ckpt={tmp_path}/checkpoints/best", "text=the red cat sat")
    assert out.returncode == 0, out.stderr
    prediction = json.loads(out.stdout.strip().splitlines()[-1])
    assert prediction["label"] == "pos" and prediction["probabilities"]["pos"] > 0.5


def test_seq2seq_learns_a_string_transformation_and_evaluate_reproduces_it(tmp_path, data, base):
    train, val = data["seq2seq"]
    summary = finetune_run(
        tmp_path / "run",
        base,
        "seq2seq",
        train,
        val,
        "data.source_field=en",
        "data.target_field=fr",
        "epochs=5",
        "optimizer.lr=3e-3",
    )
    assert summary["best_val_bleu"] >= 90

    out = lmtrain(
        "evaluate", f"ckpt={tmp_path}/run/checkpoints/best", "split=validation", f"hydra.run.dir={tmp_path / 'eval'}"
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == "seq2seq" and report["split"] == "validation" and report["num_examples"] == 100
    assert report["bleu"] == pytest.approx(summary["best_val_bleu"], abs=1e-6)
    assert report["chrf"] > 90

    out = lmtrain("generate", f"ckpt={tmp_path}/run/checkpoints/best", "prompt=cat red big tree", "temperature=0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "chat rouge grand arbre"


def test_qa_copies_the_answer_out_of_the_context(tmp_path, data, base):
    summary = finetune_run(tmp_path, base, "qa", *data["qa"], "epochs=5")
    assert summary["best_val_exact_match"] >= 0.9
    out = lmtrain(
        "generate",
        f"ckpt={tmp_path}/checkpoints/best",
        "prompt=what size is the fish?",
        "context=the fish is tall. the cat is black.",
        "temperature=0",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tall"


def test_instruction_tuning_puts_no_loss_on_the_prompt(tmp_path, base):
    from lmtrain.checkpoint.load import load_model
    from lmtrain.config import TaskConfig
    from lmtrain.data.examples import collate
    from lmtrain.tasks.registry import build_task_info, task_class
    from lmtrain.train.losses import cross_entropy

    records = [{"prompt": "say cat", "response": "cat"}, {"prompt": "say the big dog", "response": "dog dog"}]
    fields = {"text": "text", "prompt": "prompt", "response": "response"}
    info = build_task_info(TaskConfig(name="lm"), fields, records)
    assert info.instruction
    model, tokenizer = load_model(str(base), torch.device("cpu"))
    task = task_class(info.name)(info, tokenizer, model.config.max_seq_len)
    examples = task.encode(records, "data.train")
    tokens, targets = collate(examples, task.eot, -100)
    for row, record in enumerate(records):
        prompt_len = len(tokenizer.encode(record["prompt"]).ids) + 1  # prompt + EOT
        response = tokenizer.encode(record["response"]).ids + [task.eot]
        assert (targets[row, : prompt_len - 1] == -100).all()  # no prompt token is ever a target
        assert targets[row, prompt_len - 1 : prompt_len - 1 + len(response)].tolist() == response
        assert (targets[row, prompt_len - 1 + len(response) :] == -100).all()  # padding
    # the loss equals cross-entropy over the response tokens alone, and the prompt gets no gradient signal
    logits = model(tokens)
    loss_sum, count = cross_entropy(logits, targets)
    mask = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    assert count == sum(len(tokenizer.encode(r["response"]).ids) + 1 for r in records)
    torch.testing.assert_close(loss_sum, manual)


def test_instruction_tuning_runs(tmp_path, base):
    rng = random.Random(3)
    records = [{"prompt": f"repeat {w}", "response": w} for w in (rng.choice(WORDS) for _ in range(200))]
    train = write(tmp_path / "chat.jsonl", records)
    summary = finetune_run(tmp_path / "run", base, "lm", train, train, "epochs=3")
    first = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r)
    assert first["step"] == 0 and summary["metric"] == "val_loss"
    assert summary["best_val_loss"] < 0.5 * first["val_loss"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.source_field=english"], "data.train: .* has no field 'english'; its fields are en, fr"),
        (["init_from=/nonexistent/run"], "init_from: no complete checkpoint at '/nonexistent/run'"),
    ],
)
def test_finetune_errors(tmp_path, data, base, extra, message):
    train, val = data["seq2seq"]
    with pytest.raises(UserError, match=message):
        finetune_run(tmp_path, base, "seq2seq", train, val, "data.source_field=en", "data.target_field=fr", *extra)


def test_wrong_label_field_is_one_line(tmp_path, data, base):
    train, val = data["classification"]
    with pytest.raises(UserError, match="data.train: .* has no field 'lbl'; its fields are text, label"):
        finetune_run(tmp_path, base, "classification", train, val, "data.label_field=lbl")


def test_trainer_max_steps_caps_the_epochs_and_mean_pooling_is_kept(tmp_path, data, base):
    summary = finetune_run(
        tmp_path,
        base,
        "classification",
        *data["classification"],
        "epochs=50",
        "trainer.max_steps=4",
        "task.pooling=mean",
    )
    assert summary["steps"] == 4
    model, _ = load_model(str(tmp_path / "checkpoints" / "latest"), torch.device("cpu"))
    assert model.config.pooling == "mean" and model.config.num_classes == 2


def test_unseen_label_and_empty_split(tmp_path, data, base):
    train, _ = data["classification"]
    odd = write(tmp_path / "odd.jsonl", [{"text": "red cat", "label": "maybe"}])
    with pytest.raises(UserError, match="label 'maybe' in data.validation was not seen in data.train"):
        finetune_run(tmp_path / "a", base, "classification", train, odd)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="data.validation: .* holds no records"):
        finetune_run(tmp_path / "b", base, "classification", train, empty)


def test_vocabulary_mismatch_is_refused(tmp_path, base):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(base.resolve(), broken)
    model = json.loads((broken / "model.json").read_text())
    (broken / "model.json").write_text(json.dumps({**model, "vocab_size": model["vocab_size"] + 1}))
    from lmtrain.checkpoint.load import load_model

    # model.json is checked against the weights' shapes first: the vocabulary it claims is not the weights'
    with pytest.raises(UserError, match=r"init_from: .*model.json' does not match .*model.json says \[258, "):
        load_model(str(broken), torch.device("cpu"), key="init_from")


@pytest.mark.parametrize("name", ["classification", "seq2seq"])
def test_overlong_examples_are_truncated_and_counted(base, caplog, name):
    from lmtrain.checkpoint.load import load_model
    from lmtrain.config import TaskConfig
    from lmtrain.tasks.registry import build_task_info, task_class

    fields = {"text": "text", "label": "label", "source": "en", "target": "fr"}
    fits = {"text": "a" * 10, "label": 0, "en": "a" * 10, "fr": "b"}
    exact = {"text": "a" * 63, "label": 1, "en": "a" * 62, "fr": ""}  # text + EOT fill the 64-token context
    long = {"text": "a" * 500, "label": 1, "en": "a" * 500, "fr": "b" * 3}
    records = [fits, exact, long]
    model, tokenizer = load_model(str(base), torch.device("cpu"))
    info = build_task_info(TaskConfig(name=name), fields, records)
    task = task_class(name)(info, tokenizer, model.config.max_seq_len)
    with caplog.at_level("WARNING", logger="lmtrain"):
        examples = task.encode(records, "data.train")
    assert "data.train: 1 of 3 examples exceed model.max_seq_len=64" in caplog.text
    assert max(len(e.ids) for e in examples) <= model.config.max_seq_len + (0 if name == "classification" else 1)
    if name == "seq2seq":  # the target survives; the prompt loses its start
        assert examples[2].ids[examples[2].loss_start :] == tokenizer.encode("bbb").ids + [task.eot]


def test_lora_learns_the_classification_rule_and_saves_only_what_it_trains(tmp_path, data, base):
    summary = finetune_run(
        tmp_path,
        base,
        "classification",
        *data["classification"],
        "epochs=3",
        "adapter=lora",
        "adapter.rank=8",
        "adapter.alpha=16",
        "optimizer.lr=3e-3",
    )
    assert summary["best_val_accuracy"] >= 0.9
    best = tmp_path / "checkpoints" / "best"
    saved = load_file(str(best / "model.safetensors"))
    assert set(saved) == {k for k in saved if ".lora_" in k or k.startswith("classifier.")} and saved
    assert (best / "model.safetensors").stat().st_size < 0.2 * (base / "model.safetensors").stat().st_size
    optimizer = json.loads((best / "optimizer.json").read_text())
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(saved)  # state only for trained tensors
    model, _ = load_model(str(best), torch.device("cpu"))
    base_model, _ = load_model(str(base), torch.device("cpu"))
    base_state = base_model.state_dict()
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items() if k in base_state)


def test_lora_resume_is_bitwise(tmp_path, data, base):
    """Resuming an adapter run from its step-3 checkpoint ends with the uninterrupted run's adapter weights; the
    resumed run derives the same passes, micro-batch and learning rate (all null here) as the uninterrupted one."""
    common = [
        "epochs=null",
        "optimizer.lr=null",
        "trainer.micro_batch_size=null",
        "evals_per_epoch=null",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
    ]
    common += ["trainer.keep_last=0", "task.max_eval_examples=4", "data.source_field=en", "data.target_field=fr"]
    lora = ["adapter=lora", "adapter.rank=4", "adapter.target_modules=[attention]", "adapter.dropout=0.1"]
    finetune_run(tmp_path / "full", base, "seq2seq", *data["seq2seq"], *common, *lora)
    step3 = tmp_path / "full" / "checkpoints" / "step_0000003"
    finetune_run(tmp_path / "resumed", base, "seq2seq", *data["seq2seq"], *common, *lora, f"trainer.resume={step3}")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ab = ("full", "resumed")
    saved = [yaml.safe_load((tmp_path / run / "checkpoints" / "latest" / "config.yaml").read_text()) for run in ab]
    derived = [(c["epochs"], c["trainer"]["micro_batch_size"], c["optimizer"]["lr"]) for c in saved]
    assert derived[0] == derived[1] and None not in derived[0]


def test_rouge_equals_rouge_score_and_task_metric_rouge_l_picks_the_best_checkpoint(tmp_path, data, base):
    from rouge_score import rouge_scorer

    from lmtrain.tasks import metrics

    pairs = [("the cat sat on the mat", "a cat was sitting on the mat"), ("running dogs", "dogs ran"), ("", "x y")]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {name: 0.0 for name in ("rouge1", "rouge2", "rougeL")}
    for hypothesis, reference in pairs:
        for name, score in scorer.score(reference, hypothesis).items():
            expected[name] += 100 * score.fmeasure / len(pairs)
    got = metrics.rouge([h for h, _ in pairs], [r for _, r in pairs])
    assert got == pytest.approx(
        {"rouge1": expected["rouge1"], "rouge2": expected["rouge2"], "rouge_l": expected["rougeL"]}
    )

    train, val = data["seq2seq"]
    fields = ["data.source_field=en", "data.target_field=fr", "epochs=3", "optimizer.lr=3e-3"]
    summary = finetune_run(tmp_path / "run", base, "seq2seq", train, val, *fields, "task.metric=rouge_l")
    assert summary["metric"] == "val_rouge_l"
    scores = {
        r["step"]: r["val_rouge_l"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_rouge_l" in r
    }
    best_step = max((step for step in scores if step > 0), key=lambda step: scores[step])
    assert summary["best_val_rouge_l"] == scores[best_step]
    state = json.loads((tmp_path / "run" / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == best_step
    out = lmtrain(
        "evaluate", f"ckpt={tmp_path}/run/checkpoints/best", "split=validation", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["rouge_l"] == pytest.approx(scores[best_step], abs=1e-6) and "bleu" in report


def test_explicit_eval_every_and_eval_batches_are_honoured(tmp_path, data, base, caplog):
    """trainer.eval_every on the command line replaces the per-epoch interval; validation scores the first
    trainer.eval_batches × micro_batch_size examples of the 100, not all of them."""
    train, val = data["classification"]
    args = [f"init_from={base}", "task=classification", f"data.train={train}", f"data.validation={val}"]
    args += ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.max_steps=3", "trainer.eval_every=1"]
    cfg = check("finetune", FinetuneConfig, [*args, "trainer.eval_batches=1", "trainer.micro_batch_size=4"])
    assert cfg.evals_per_epoch is None
    with caplog.at_level("INFO", logger="lmtrain"):
        finetune.run(cfg, str(tmp_path))
    validations = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["step"] for r in validations] == [0, 1, 2, 3]
    assert all((r["val_accuracy"] * 4).is_integer() for r in validations)  # 4 examples scored
    assert "validation: the first 4 of 100 examples (trainer.eval_batches × micro_batch_size)" in caplog.text
    with pytest.raises(UserError, match="trainer.eval_every: evals_per_epoch is set too"):
        check("finetune", FinetuneConfig, [*args, "evals_per_epoch=2"])


def test_defaults_are_derived_logged_and_recorded_and_a_cap_given_is_honoured(tmp_path, data, base, caplog):
    """With nothing but the task and its data, the micro-batch, passes and rate come from the 1,200 training
    examples and the model's size, in one log line, and the run's config records them; a trainer.max_steps,
    optimizer.lr or trainer.micro_batch_size given is kept as given."""
    train, val = data["classification"]
    args = [f"init_from={base}", "task=classification", f"data.train={train}", f"data.validation={val}"]
    args += ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.max_steps=3"]
    with caplog.at_level("INFO", logger="lmtrain"):
        assert finetune.run(check("finetune", FinetuneConfig, args), str(tmp_path / "a"))["steps"] == 3
    lines = [r.getMessage() for r in caplog.records if "defaults derived" in r.getMessage()]
    model, _ = load_model(str(tmp_path / "a" / "checkpoints" / "latest"), torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters())  # a full finetune trains every weight
    assert lines == [
        f"defaults derived from 1,200 training examples and {trainable:,} trainable parameters: "
        "micro_batch_size=16, epochs=4.17, lr=0.0005 (set any of them to override)"
    ]
    assert "epochs=4.17 would be 313 steps; trainer.max_steps caps the run at 3" in caplog.text
    saved = yaml.safe_load((tmp_path / "a" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert (saved["epochs"], saved["trainer"]["micro_batch_size"], saved["optimizer"]["lr"]) == (4.17, 16, 5e-4)
    caplog.clear()
    given = [*args, "optimizer.lr=2e-3", "trainer.micro_batch_size=8", "trainer.max_steps=2"]
    with caplog.at_level("INFO", logger="lmtrain"):
        assert finetune.run(check("finetune", FinetuneConfig, given), str(tmp_path / "b"))["steps"] == 2
    assert "trainable parameters: epochs=4.17 (set any" in caplog.text  # only the passes were derived
    saved = yaml.safe_load((tmp_path / "b" / "checkpoints" / "latest" / "config.yaml").read_text())
    assert (saved["trainer"]["micro_batch_size"], saved["optimizer"]["lr"]) == (8, 2e-3)
