"""Every option of every config group trains a few steps (model presets shrunk to tiny sizes).
The finetune-only options (task=*, adapter=*, trainer=finetune) train in test_finetune.py."""

import importlib.resources
import math

import pytest
import torch
from conftest import TINY, compose

from lmtrain.commands import pretrain
from lmtrain.train.sinks import read_metrics


def options(group):
    folder = importlib.resources.files("lmtrain.configs") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


SHRINK = ["model.d_model=32", "model.num_heads=2", "model.num_layers=1", "model.max_seq_len=32"]
CASES = (
    [[f"model={o}", *SHRINK] for o in options("model")]
    + [[f"{g}={o}"] for g in ("optimizer", "scheduler", "loss", "data") for o in options(g) if o != "examples"]
    + [
        ["grad_accum=steps", "grad_accum.steps=2"],
        ["grad_accum=global_batch", "grad_accum.global_batch_tokens=256"],
    ]
    + [[f"trainer={o}"] for o in options("trainer")]
    + [["trainer.precision=bf16"], ["trainer.precision=fp16"], ["model.dropout=0.1"]]
    # the embedded default corpus, cut short
    + [["data.train=python-stdlib", "data.max_chars=300000", "data.tokenizer=bpe", "data.vocab_size=512"]]
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("teacher")
    pretrain.run(compose(*TINY, f"data.train={corpus}", "model.d_model=96"), str(run_dir))
    return run_dir


@pytest.mark.parametrize("overrides", CASES, ids=[" ".join(c) for c in CASES])
def test_option_trains(tmp_path, corpus, overrides, request):
    if "loss=distill" in overrides:
        overrides = [*overrides, f"loss.teacher={request.getfixturevalue('teacher')}"]
    group_choice = [o for o in overrides if "." not in o.split("=")[0]]
    # group options first, then the tiny settings, then the case's own values
    cfg = compose(*group_choice, *TINY, f"data.train={corpus}", *[o for o in overrides if o not in group_choice])
    # trainer=gpu runs here on the CPU (TINY sets the device): its bf16 autocast and torch.compile still run
    best = pretrain.run(cfg, str(tmp_path))["objective"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert math.isfinite(best)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_teacher_with_another_vocabulary_is_refused(tmp_path, corpus, teacher):
    from lmtrain.core.errors import UserError

    cfg = compose(*TINY, f"data.train={corpus}", "data.tokenizer=byte", "loss=distill", f"loss.teacher={teacher}")
    with pytest.raises(UserError, match=r"loss.teacher: its tokenizer \(\d+ entries\) is not the student's"):
        pretrain.run(cfg, str(tmp_path))


def test_int8_export_loads_and_generates(tmp_path, teacher):
    from conftest import lmtrain

    out = lmtrain("export", f"ckpt={teacher}", "quantize=int8", f"out={tmp_path / 'int8'}")
    assert out.returncode == 0, out.stderr
    assert "val before" in out.stdout and "val after" in out.stdout
    import json

    report = json.loads((tmp_path / "int8" / "report.json").read_text())
    assert report["bytes"] < 0.6 * report["fp32_bytes"]
    assert abs(report["validation_after"]["loss"] - report["validation_before"]["loss"]) < 0.05
    from lmtrain.checkpoint.export import Int8Linear
    from lmtrain.checkpoint.load import load_model

    model, _ = load_model(str(tmp_path / "int8"), torch.device("cpu"))
    assert model.blocks[0].attn.qkv.weight.dtype == torch.int8 and isinstance(model.blocks[0].ffn.up, Int8Linear)
    refused = lmtrain("export", f"ckpt={teacher}", f"out={teacher}")  # never replaces a folder that is not an export
    assert refused.returncode == 2 and "is not an lmtrain export" in refused.stderr
    assert (teacher / "checkpoints").is_dir()
    gen = lmtrain("generate", f"ckpt={tmp_path / 'int8'}", "prompt=the ", "max_new_tokens=20", "temperature=0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("the ") and len(gen.stdout.strip()) > 10
