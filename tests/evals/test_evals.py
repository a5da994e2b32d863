"""Benchmark suites (lmtrain.evals) against lm-evaluation-harness itself: the same task files, the same model,
the same per-example choices, generations and scores; and the task-file errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from hf_models import build

from lmtrain.core.errors import UserError

EXAMPLES = Path(__file__).parents[2] / "configs" / "eval"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SOUNDS = {"fox": "yip", "dog": "woof", "cat": "meow", "owl": "hoot", "bee": "buzz", "hen": "cluck"}
ANIMALS, COLORS = list(SOUNDS), ["brown", "lazy", "quick", "red", "grey", "small"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def tasks(tmp_path, monkeypatch) -> Path:
    """The example task files in a fresh folder, which is the working directory (lm-evaluation-harness reads
    relative data_files from there)."""
    folder = tmp_path / "tasks"
    shutil.copytree(EXAMPLES, folder)
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build("llama", tmp_path_factory.mktemp("llama") / "model")


def qa_corpus(path: Path, lines: int = 400) -> Path:
    """Text in the example tasks' formats, so a tiny model learns to answer some of them."""
    rng = random.Random(0)
    text = []
    for _ in range(lines):
        animal = rng.choice(list(SOUNDS))
        text.append(f"Q: what does the {rng.choice(COLORS)} {animal} say?\nA: {SOUNDS[animal]}\n")
    path.write_text("\n".join(text))
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A GPT-2 trained by lmtrain (BPE, a few dozen steps), exported with `export format=hf`."""
    from conftest import TINY

    from lmtrain.cli import check
    from lmtrain.commands import export, pretrain
    from lmtrain.config import ExportConfig, PretrainConfig

    root = tmp_path_factory.mktemp("gpt2")
    corpus = qa_corpus(root / "corpus.txt")
    overrides = [o for o in TINY if not o.startswith(("data.tokenizer", "model.max_seq_len", "trainer.max_steps"))]
    overrides += ["data.tokenizer=bpe", "data.vocab_size=300", "model.max_seq_len=128", "trainer.max_steps=150"]
    overrides += [
        "optimizer.lr=0.01",
        "trainer.eval_every=50",
        f"data.train={corpus}",
        f"data.cache_dir={root / 'cache'}",
    ]
    pretrain.run(check("pretrain", PretrainConfig, overrides), str(root / "run"))
    out = root / "hf"
    ckpt = str(root / "run" / "checkpoints" / "latest")
    export.run(ExportConfig(ckpt=ckpt, format="hf", out=str(out), device="cpu"), str(root))
    return out


def harness(model: Path, task: str, shots: int, folder: Path) -> tuple[dict, list[dict]]:
    """lm-evaluation-harness's HF backend on `task` (a YAML in `folder`): its results and samples by doc_id."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},dtype=float32",
        tasks=[task],
        num_fewshot=shots,
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        device="cpu",
        batch_size=4,
    )
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def ours(model: Path, task: str, shots: int, folder: Path):
    from lmtrain.checkpoint.load import load_model, load_special_tokens
    from lmtrain.evals.scorer import Scorer
    from lmtrain.evals.suite import load_suite, score_suite

    lm, tokenizer = load_model(str(model), torch.device("cpu"))
    scorer = Scorer(lm, tokenizer, load_special_tokens(str(model), tokenizer), torch.device("cpu"), batch_size=4)
    _, specs = load_suite(folder / f"{task}.yaml")
    return score_suite(specs, scorer, num_fewshot=shots)[task]


def assert_same(reference: tuple[dict, list[dict]], result) -> None:
    """Per example: the chosen index (or the generated text and its extraction) and every score equal; the
    log-likelihoods agree to float32 rounding. Aggregates equal exactly."""
    metrics, samples = reference
    assert len(samples) == result.n
    for theirs, mine in zip(samples, result.samples, strict=True):
        if "loglikelihoods" in mine:
            lls = [float(resp[0][0]) for resp in theirs["resps"]]  # the lm_eval command logs them as text
            assert mine["pred"] == max(range(len(lls)), key=lambda i: (lls[i], -i))
            assert mine["loglikelihoods"] == pytest.approx(lls, abs=2e-4)
            assert all(mine[m] == theirs[m] for m in result.metrics)
        else:
            assert mine["generated"] == theirs["resps"][0][0]
            assert mine["filtered,extract"] == theirs["filtered_resps"][0]
            assert mine["exact_match"] == theirs["exact_match"]
    for name, value in result.metrics.items():
        assert value == metrics[f"{name},{'extract' if name == 'exact_match' else 'none'}"]


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("task", ["tiny_choice", "tiny_answer"])
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_scores_equal_lm_evaluation_harness(request, tasks, which, task, shots):
    model = request.getfixturevalue(which)
    result = ours(model, task, shots, tasks)
    assert_same(harness(model, task, shots, tasks), result)
    if which == "gpt2" and task == "tiny_answer" and shots == 0:  # the trained model answers some: not all 0
        assert 0 < result.metrics["exact_match"]


@pytest.mark.parametrize("task, shots", [("tiny_fill", 0), ("tiny_fill", 3), ("tiny_text", 0)])
def test_partial_scoring_and_bits_per_byte_equal_lm_evaluation_harness(llama, tasks, task, shots):
    result = ours(llama, task, shots, tasks)
    metrics, samples = harness(llama, task, shots, tasks)
    if task == "tiny_text":
        assert [s["loglikelihood"] for s in result.samples] == pytest.approx(
            [s["resps"][0][0] for s in samples], abs=1e-3
        )
        for name, value in result.metrics.items():
            assert value == pytest.approx(metrics[f"{name},none"], rel=1e-6)
    else:
        assert_same((metrics, samples), result)


def test_the_lm_eval_command_scores_an_exported_folder_as_lmtrain_does(gpt2, tasks, tmp_path):
    """The command the docs show (`lm_eval --model hf` on an `export format=hf` folder) runs on a local task."""
    out = tmp_path / "lm_eval_out"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={gpt2},dtype=float32"]
    command += ["--tasks", "tiny_choice", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4"]
    command += ["--output_path", str(out), "--log_samples"]
    subprocess.run(command, check=True, capture_output=True, cwd=tasks, timeout=300)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["tiny_choice"]
    samples = [json.loads(line) for line in next(out.rglob("samples_tiny_choice_*.jsonl")).read_text().splitlines()]
    assert_same((results, sorted(samples, key=lambda s: s["doc_id"])), ours(gpt2, "tiny_choice", 0, tasks))


def write_task(folder: Path, records: list[dict], **keys) -> Path:
    data = write_jsonl(folder / "data.jsonl", records)
    task = {"task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    task |= {"test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}"}
    task |= {"doc_to_target": "gold", "doc_to_choice": "choices"} | keys
    path = folder / "task.yaml"
    path.write_text(json.dumps(task))
    return path


GOOD = {"q": "a?", "choices": ["x", "y"], "gold": 1}


@pytest.mark.parametrize(
    "record, keys, message",
    [
        ({"q": "a?", "choices": ["x", "y"]}, {}, "record 1: doc_to_target: the field 'gold' is missing"),
        (
            {"q": "a?", "choices": ["x", "y"], "gold": 2},
            {},
            "record 1: doc_to_target: gold index 2 is out of range for 2 choices",
        ),
        ({"q": "a?", "choices": [], "gold": 0}, {}, "record 1: doc_to_choice: needs a non-empty list of strings"),
        (GOOD, {"doc_to_text": "{{ question }}"}, "record 0: doc_to_text: 'question' is undefined"),
        (GOOD, {"doc_to_target": "{{ label }}"}, "record 0: doc_to_target: 'label' is undefined"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_record_and_field(tmp_path, record, keys, message):
    from lmtrain.evals.documents import Documents, load_splits
    from lmtrain.evals.runner import run_task
    from lmtrain.evals.suite import load_suite

    path = write_task(tmp_path, [GOOD, record], **keys)
    _, (spec,) = load_suite(path)
    with pytest.raises(UserError) as err:
        run_task(spec, Documents(spec, load_splits(spec)), None, 0, None, lambda n: None)  # type: ignore[arg-type]
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"process_docs": "!function utils.process"}, "process_docs: !function entries run Python"),
        ({"metric_list": [{"metric": "bleu"}]}, "metric_list[0].metric: 'bleu' is not one lmtrain computes"),
        ({"task": None}, "task: missing"),
        ({"output_type": "loglikelihood"}, "output_type: 'loglikelihood' is not one of"),
        ({"use_prompt": "p"}, "use_prompt: not supported by lmtrain"),
    ],
)
def test_a_key_lmtrain_cannot_run_is_one_line_naming_file_and_key(tmp_path, keys, message):
    from lmtrain.evals.suite import load_suite

    path = write_task(tmp_path, [GOOD], **{k: v for k, v in keys.items() if not str(v).startswith("!")})
    if "process_docs" in keys:
        path.write_text(path.read_text()[:-1] + ', "process_docs": !function utils.process}')
    with pytest.raises(UserError) as err:
        load_suite(path)
    assert str(err.value).startswith(f"{path}: {message}")


def pretrain_with_suite(run_dir: Path, corpus: Path, *extra: str) -> dict:
    from conftest import TINY

    from lmtrain.cli import check
    from lmtrain.commands import pretrain
    from lmtrain.config import PretrainConfig

    overrides = [o for o in TINY if not o.startswith("data.tokenizer")] + ["data.tokenizer=byte"]
    overrides += [f"data.train={corpus}", f"trainer.eval_suite={EXAMPLES / 'core_small.yaml'}"]
    overrides += ["trainer.eval_suite_every=6", "trainer.eval_suite_limit=3"]
    return pretrain.run(check("pretrain", PretrainConfig, [*overrides, *extra]), str(run_dir))


def test_eval_suite_scores_at_its_cadence_and_resume_keeps_them(tmp_path, corpus, monkeypatch, capsys):
    from conftest import assert_resume_is_exact

    from lmtrain.commands.report import main as report
    from lmtrain.train.sinks import read_metrics

    def run(run_dir, *extra):
        pretrain_with_suite(run_dir, corpus, *extra)

    run(tmp_path / "straight")
    validations = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in validations] == [0, 3, 6]
    assert [r["step"] for r in validations if "val_suite_core" in r] == [0, 6]
    final = validations[-1]
    assert {"val_suite_tiny_choice_acc", "val_suite_tiny_fill_acc", "val_suite_tiny_answer_exact_match"} <= set(final)
    assert report([str(tmp_path / "straight"), "--out", str(tmp_path / "plots")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "core" in header and "tiny_choice_acc_norm" in header and (tmp_path / "plots" / "report_suite.png").is_file()
    assert_resume_is_exact(run, tmp_path, monkeypatch, 4, "step_0000003")


def test_eval_suite_metric_picks_the_best_checkpoint(tmp_path, corpus):
    run_dir = tmp_path / "run"
    summary = pretrain_with_suite(
        run_dir, corpus, "trainer.eval_suite_every=null", "trainer.eval_suite_metric=suite_tiny_fill_acc"
    )
    assert (
        summary["metric"] == "val_suite_tiny_fill_acc"
        and summary["objective"] == -summary["best_val_suite_tiny_fill_acc"]
    )
    assert (run_dir / "checkpoints" / "best").exists()


def test_evaluate_command_on_checkpoint_lora_and_hf_folder(tiny_checkpoint, llama, tmp_path):
    """`lmtrain evaluate suite=...` on an lmtrain checkpoint, a LoRA checkpoint (finetuned with the suite scored
    at its validations) and a Hugging Face folder."""
    from conftest import lmtrain_many

    from lmtrain.cli import check
    from lmtrain.commands import finetune
    from lmtrain.config import FinetuneConfig
    from lmtrain.train.sinks import read_metrics

    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"the quick brown fox {i} jumps"} for i in range(24)])
    overrides = [f"init_from={llama}", "task=lm", f"data.train={train}", "adapter=lora", "epochs=null"]
    overrides += ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.micro_batch_size=4", "trainer.device=cpu"]
    overrides += [
        "scheduler.warmup_steps=1",
        "trainer.progress_bar=false",
        f"trainer.eval_suite={EXAMPLES / 'tiny_choice.yaml'}",
    ]
    finetune.run(check("finetune", FinetuneConfig, overrides), str(tmp_path / "lora"))
    assert "val_suite_tiny_choice_acc_norm" in read_metrics(tmp_path / "lora" / "metrics.jsonl")[-1]
    checkpoints = {"lmtrain": tiny_checkpoint, "lora": tmp_path / "lora" / "checkpoints" / "latest", "hf": llama}
    suite = [f"suite={EXAMPLES / 'core_small.yaml'}", "suite.limit=4", "device=cpu"]
    cases = [["evaluate", f"ckpt={c}", *suite, f"hydra.run.dir={tmp_path / n}"] for n, c in checkpoints.items()]
    for name, result in zip(checkpoints, lmtrain_many(cases, tmp_path), strict=True):
        assert result["rc"] == 0, result["stderr"]
        scores = json.loads((tmp_path / name / "eval.json").read_text())
        assert {t: s["n"] for t, s in scores.items() if t != "suite"} == {
            "tiny_choice": 4,
            "tiny_fill": 4,
            "tiny_answer": 4,
        }
        assert "tiny_choice" in result["stdout"] and (tmp_path / name / "samples.jsonl").is_file()


def test_the_docs_commands_compose(tiny_runs, tmp_path):
    """Every `lmtrain` line of docs/benchmarks.md composes, validates and finds its paths (`--cfg job`)."""
    import re
    import shlex

    from conftest import lmtrain_many

    text = (Path(__file__).parents[2] / "docs" / "benchmarks.md").read_text()
    blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if not lang]
    lines = [line for block in blocks for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("lmtrain ")]
    assert len(commands) >= 5
    (tmp_path / "outputs").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "outputs" / "run").symlink_to(tiny_runs["lm"])
    (tmp_path / "models" / "SmolLM2-135M").symlink_to(tiny_runs["lm"] / "checkpoints" / "latest")
    (tmp_path / "configs").symlink_to(EXAMPLES.parent)
    shutil.copy(EXAMPLES / "tiny_choice.yaml", tmp_path / "my_tasks.yaml")
    cases = [shlex.split(re.sub(r"outputs/<[^>]+>", "outputs/run", line))[1:] + ["--cfg", "job"] for line in commands]
    for argv, result in zip(cases, lmtrain_many(cases, tmp_path), strict=True):
        assert result["rc"] == 0 and not result["stderr"], (argv, result["stderr"])
