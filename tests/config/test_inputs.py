"""Issue 12, case by case: each kind of awkward input gets the right value or the right one-line error."""

import json
import logging
import os

import pytest
import torch
from conftest import TINY, lmtrain, prepare_tokens, write_jsonl

from lmtrain.commands import evaluate, finetune, predict, pretrain
from lmtrain.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    PredictConfig,
    PretrainConfig,
    TaskConfig,
)
from lmtrain.config.compose import check, first_values, literal_strings
from lmtrain.config.paths import check_paths
from lmtrain.core.errors import UserError
from lmtrain.data import corpus as corpus_module
from lmtrain.data.examples import Example, usable_records
from lmtrain.data.tokenizer import END_OF_TEXT, MAX_PIECE, build_tokenizer, load_tokenizer, warn_unknown
from lmtrain.model.generate import filter_logits, scale
from lmtrain.tasks.base import TaskInfo
from lmtrain.tasks.registry import build_task_info, task_class
from lmtrain.train.sinks import read_metrics

GOOD = [{"text": "the red cat", "label": 1}, {"text": "a dog", "label": 0}] * 4
FAST = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.micro_batch_size=4"]


# 1. missing or null fields -------------------------------------------------------------------------------
def test_bad_records_are_skipped_and_counted_or_named():
    records = [GOOD[0], {"label": 1, "text": None}, {"label": 0, "text": 3}, GOOD[1]]
    kept, skipped = usable_records(records, {"text": (str,), "label": (int, str)}, "data.train", "t.jsonl", "skip")
    assert kept == [GOOD[0], GOOD[1]] and skipped == 2
    with pytest.raises(UserError, match=r"^data.train: 't.jsonl' line 2: field 'text' is null or missing$"):
        usable_records(records, {"text": (str,)}, "data.train", "t.jsonl", "error")
    with pytest.raises(UserError, match="no usable record is left"):
        usable_records(records[1:3], {"text": (str,)}, "data.train", "t.jsonl", "skip")


def test_finetune_evaluate_predict_skip_null_texts(tiny_runs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], {"label": 1}, {"text": None, "label": 0}, *GOOD])
    overrides = [f"init_from={tiny_runs['lm']}", f"data.train={data}", f"data.validation={data}", "epochs=null"]
    overrides += ["trainer.max_steps=1", "trainer.eval_every=1", *FAST]
    finetune.run(check("finetune", FinetuneConfig, overrides), str(tmp_path / "ft"))
    first = read_metrics(tmp_path / "ft" / "metrics.jsonl")[0]
    assert first == {"step": 0, "skipped_train_records": 2, "skipped_validation_records": 2}

    ckpt = tiny_runs["classifier"] / "checkpoints" / "latest"
    evaluate.run(check("evaluate", EvaluateConfig, [f"ckpt={ckpt}", f"data.test={data}", "device=cpu"]), str(tmp_path))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["skipped_records"] == 2 and report["num_examples"] == len(GOOD) + 1

    out = tmp_path / "p.jsonl"
    predict.run(check("predict", PredictConfig, [f"ckpt={ckpt}", f"input={data}", f"output={out}"]), str(tmp_path))
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts == [r["text"] for r in [GOOD[0], *GOOD]]  # no prediction for "None"


def test_pretraining_counts_skipped_records(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": None}, {"text": 5}, {"other": 1}])
    skipped = {}
    files = corpus_module.resolve_files(str(data), "data.train")
    texts = list(corpus_module.iter_documents(str(data), files, "text", "data.train", "skip", skipped))
    assert texts == ["abc"] and skipped == {"data.train": 3}
    with pytest.raises(UserError, match="line 2: field 'text' is null or missing"):
        list(corpus_module.iter_documents(str(data), files, "text", "data.train", "error"))


def test_a_corpus_left_without_text_says_why(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": None}, {"text": ""}, {"text": 5}])
    with pytest.raises(UserError, match=r"holds no text \(2 records skipped for a null, missing or non-text field, "):
        prepare_tokens(tmp_path / "cache", data)


# 2. nothing to score is an error, never a perfect score --------------------------------------------------
def test_empty_texts_have_no_tokens_to_score():
    tokenizer = build_tokenizer("byte", [], 0)
    task = task_class("lm")(TaskInfo("lm", {"text": "text"}), tokenizer, 16)
    with pytest.raises(UserError, match=r"^data.validation: no tokens to score: every text is empty$"):
        task.encode([{"text": ""}] * 3, "data.validation")
    with pytest.raises(UserError, match="data.train: no tokens to train on"):
        task.encode([{"text": ""}], "data.train")

    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 257)

    with pytest.raises(UserError, match="no tokens to score"):
        task.evaluate(Uniform(), [Example([task.eot])], batch_size=2, device=torch.device("cpu"))


# 3. BPE on long unbroken lines ---------------------------------------------------------------------------
def test_bpe_pre_tokenizes_ordinary_text_as_gpt2_does():
    from tokenizers import pre_tokenizers

    text = "First Citizen:\nWe're   told, 'tis 2024!  héllo wörld 日本語\n\n\tdef f(x):  return x**2 # ok\n"
    ours = build_tokenizer("bpe", [text], 300).pre_tokenizer.pre_tokenize_str(text)
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    assert ours == gpt2


def test_bpe_splits_long_pieces(caplog):
    line = "abcdefgh" * 1500  # 12,000 letters, no space
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        tokenizer = build_tokenizer("bpe", [line, "def f(x):\n    return x\n"], 300)
    pieces = tokenizer.pre_tokenizer.pre_tokenize_str(line)
    assert max(len(p) for p, _ in pieces) == MAX_PIECE and "".join(p for p, _ in pieces) == line
    assert max(len(t) for t in tokenizer.get_vocab()) <= MAX_PIECE
    assert tokenizer.decode(tokenizer.encode(line).ids) == line
    assert "runs of 10,000+ characters" in caplog.text


# 4. every sweep syntax passes the pre-check ---------------------------------------------------------------
def test_sweep_syntaxes_expand_to_a_first_job():
    assert first_values(["model=glob(*)"]) == ["model=gpt2_124m"]
    assert first_values(["model=glob(*,exclude=[gpt2*,llama*])"]) == ["model=mistral_7b"]
    assert first_values(["trainer.max_steps=range(2,5)"]) == ["trainer.max_steps=2"]
    assert first_values(["optimizer.lr=choice(1e-3,3e-3)"]) == ["optimizer.lr=0.001"]
    assert first_values(["model=tag(a,choice(tiny,small))"]) == ["model=tiny"]
    search = ["+search=optuna", "optimizer.lr=tag(log,interval(1e-4,1e-2))"]
    assert first_values(search) == ["+search=optuna", "optimizer.lr=0.0001"]
    with pytest.raises(ConfigError, match="model=tiyn: no such option"):
        first_values(["model=choice(tiny,tiyn)"])


def test_glob_sweep_runs(tmp_path, corpus):
    sweep = tmp_path / "sweep"
    result = lmtrain("pretrain", "-m", "model=glob(ti*)", *TINY[1:], f"data.train={corpus}", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "completed"
    assert not (sweep / "1").exists()


# 5. string values arrive as typed ------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["def ", "1_000", "1.50", "true", "it's", "a,b", "{name: x}", " x\\"])
def test_string_keys_keep_the_literal(raw):
    overrides = literal_strings(GenerateConfig, ["ckpt=x", f"prompt={raw}", "top_k=5"], multirun=False)
    cfg = check("generate", GenerateConfig, overrides)
    assert cfg.prompt == raw and cfg.top_k == 5


def test_quoting_leaves_null_sweeps_and_choices_alone():
    given = ["prompt_file=null", "prompt='x '", "device=cpu", "top_k=5", "ckpt=${oc.env:HOME}"]
    assert literal_strings(GenerateConfig, given, multirun=False) == given
    assert literal_strings(PretrainConfig, ["data.train=a.txt,b.txt"], multirun=True) == ["data.train=a.txt,b.txt"]


# 6. a dict or list where a value belongs ------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, schema, overrides, message",
    [
        ("finetune", FinetuneConfig, ["init_from=x", "data.train=x.jsonl", "epochs={}"], "epochs: expected a single"),
        ("predict", PredictConfig, ["ckpt=x", "text=t", "batch_size=[1]"], "batch_size: expected a single value"),
        ("generate", GenerateConfig, ["ckpt=x", "seed={a: 1}"], "seed: expected a single value, got a dict"),
    ],
)
def test_container_for_a_value_is_one_line(command, schema, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        check(command, schema, overrides)
    assert len(str(err.value).splitlines()) == 1


# 7. user text never becomes a special token ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_special_token_spelling_is_plain_text(kind, tmp_path):
    text = "Use <|endoftext|> to end."
    tokenizer = build_tokenizer(kind, [text + " abc " * 50], 300)
    tokenizer.save(str(tmp_path / "t.json"))
    for tok in (tokenizer, load_tokenizer(str(tmp_path / "t.json"))):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.token_to_id(END_OF_TEXT) not in ids and tok.decode(ids) == text


# 8. paths: unreadable and unwritable (root ignores permissions, so os.access stands in) --------------------
def test_paths_that_cannot_be_read_or_written(tmp_path, monkeypatch):
    data = tmp_path / "train.txt"
    data.write_text("hello\n")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    cfg = check("pretrain", PretrainConfig, [f"data.train={data}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(UserError) as err:
        check_paths(cfg)
    assert str(err.value).splitlines() == [
        f"data.train: cannot read '{data}': permission denied",
        f"data.cache_dir: cannot create '{tmp_path / 'cache'}': folder '{tmp_path}' is not writable",
    ]


# 9. sampling filters at their boundaries ------------------------------------------------------------------
def kept(logits, top_k=None, top_p=None):
    return torch.isfinite(filter_logits(logits, top_k, top_p))[0].tolist()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log()
    assert kept(logits, top_p=0.8) == [True, False, False, True]
    assert kept(logits, top_p=0.5) == [False, False, False, True]
    assert kept(logits, top_p=0.81).count(True) == 3
    assert kept(logits, top_p=1.0) == [True] * 4
    assert kept(logits, top_p=1e-9) == [False, False, False, True]


def test_top_k_boundaries_and_temperatures():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert kept(logits, top_k=4) == [True] * 4
    assert kept(logits, top_k=1) == [False, True, True, False]  # ties with the k-th are kept
    assert scale(logits, 1e-30).softmax(-1).tolist() == [[0.0, 0.5, 0.5, 0.0]]
    assert torch.allclose(scale(logits, 1e30).softmax(-1), torch.full((1, 4), 0.25))


# 10, 12. label types ---------------------------------------------------------------------------------------
def test_labels_match_by_text_across_files():
    tokenizer = build_tokenizer("byte", [], 0)
    train = [{"text": "a", "label": "0"}, {"text": "b", "label": "1"}]
    info = build_task_info(TaskConfig(), {"text": "text", "label": "label"}, train)
    task = task_class(info.name)(info, tokenizer, 16)
    examples = task.encode([{"text": "c", "label": 1}, {"text": "d", "label": 0}], "data.validation")
    assert [e.label for e in examples] == [1, 0]
    with pytest.raises(UserError, match=r"label 2 in data.validation was not seen in data.train \(known: '0', '1'\)"):
        task.encode([{"text": "c", "label": 2}], "data.validation")


def test_one_string_label_among_ints_is_an_error():
    train = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": "positive"}]
    with pytest.raises(
        UserError, match=r"label 'positive' \(record 3 of data.train\) is a str but most labels are ints"
    ):
        build_task_info(TaskConfig(), {"text": "text", "label": "label"}, train)


# 11. characters a char vocabulary lacks ---------------------------------------------------------------------
def test_unknown_chars_are_warned_once(caplog, monkeypatch):
    from lmtrain.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "_warned", set())  # once per process: earlier tests may have warned
    tokenizer = build_tokenizer("char", ["abc "], 0)
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        warn_unknown(tokenizer, ["abc é7", "7é"], "prompt")
        warn_unknown(tokenizer, ["é"], "prompt")
    assert caplog.text.count("no entry for") == 1
    assert "prompt: the char tokenizer has no entry for '7' 'é'" in caplog.text
    assert build_tokenizer("byte", [], 0).get_vocab_size() and not any(
        "no entry" in r.message for r in caplog.records[1:]
    )


# 13. a quick try needs one setting -----------------------------------------------------------------------------
def test_short_run_warms_up_for_the_whole_run(tmp_path, corpus, caplog):
    overrides = [o for o in TINY if not o.startswith(("scheduler.warmup_steps", "trainer.max_steps"))]
    cfg = check("pretrain", PretrainConfig, [*overrides, f"data.train={corpus}", "trainer.max_steps=3"])
    assert cfg.scheduler.warmup_steps == 50  # the default, kept; the trainer shortens it
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        pretrain.run(cfg, str(tmp_path))
    assert "scheduler.warmup_steps: 50 is longer than the run; cut to its 3 steps" in caplog.text
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([cfg.optimizer.lr * (step + 1) / 4 for step in range(3)])
    with pytest.raises(ConfigError, match="scheduler.warmup_steps: 10 exceeds trainer.max_steps=3"):
        check("pretrain", PretrainConfig, ["trainer.max_steps=3", "scheduler.warmup_steps=10"])


def test_export_scores_eval_batches_of_a_task_or_nothing(tiny_runs, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from lmtrain.checkpoint.load import load_model, load_special_tokens
    from lmtrain.commands import export
    from lmtrain.config import ExportConfig
    from lmtrain.tasks.base import load_task_info
    from lmtrain.tasks.records import split_examples
    from lmtrain.tasks.registry import task_for

    ckpt = tiny_runs["classifier"] / "checkpoints" / "latest"
    monkeypatch.setattr(export, "TASK_BATCH", 2)
    export.run(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "a"), eval_batches=1, device="cpu"), ".")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    model, tokenizer = load_model(str(ckpt), torch.device("cpu"))
    info = load_task_info(str(ckpt))
    task = task_for(info, tokenizer, model.config.max_seq_len, load_special_tokens(str(ckpt), tokenizer))
    examples = split_examples(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")), task, "validation")[0]
    assert len(examples) > 2  # one batch of 2 is what export scored
    scored = task.evaluate(model, examples[:2], batch_size=2, device=torch.device("cpu"))
    assert report["validation_before"]["loss"] == pytest.approx(scored["loss"], rel=1e-6)
    export.run(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "b"), score=False, device="cpu"), ".")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["validation_before"] is None and report["validation_after"] is None
