"""End-to-end: the real `lmtrain` CLI in a subprocess."""

import json

from conftest import TINY, lmtrain

from lmtrain.train.sinks import read_metrics


def test_pretrain_then_generate(tmp_path, corpus):
    run_dir = tmp_path / "run"
    result = lmtrain(
        "pretrain",
        *TINY,
        f"data.train={corpus}",
        "trainer.max_steps=40",
        "trainer.eval_every=20",
        "trainer.log_every=10",
        "trainer.checkpoint_every=20",
        "optimizer.lr=3e-3",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert {".hydra", "metrics.jsonl", "tokenizer.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert set(train[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "epochs"}
    assert 0 < train[-1]["mfu"] < 1
    assert [r["step"] for r in val] == [0, 20, 40] and set(val[0]) == {"step", "val_loss", "val_ppl"}
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5
    assert "best val_loss" in result.stdout + result.stderr
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step_0000040"

    out = lmtrain("generate", f"ckpt={run_dir}/checkpoints/latest", "prompt=the ", "max_new_tokens=30", "temperature=0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the ") and len(out.stdout.strip()) > 20
    assert "mat" in out.stdout  # the corpus's most frequent word
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the ")  # prompt=the  keeps its trailing space, as a file does
    from_file = lmtrain("generate", f"ckpt={run_dir}", f"prompt_file={prompt}", "max_new_tokens=30", "temperature=0")
    assert from_file.returncode == 0 and from_file.stdout == out.stdout


def test_multirun_sweep(tmp_path, corpus):
    sweep = tmp_path / "sweep"
    result = lmtrain(
        "pretrain", "-m", *TINY, f"data.train={corpus}", "optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"
    )
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "latest" / "trainer_state.json").is_file()
        overrides = (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert "optimizer.lr=" in overrides


def test_bad_data_path_is_one_line(tmp_path):
    result = lmtrain("pretrain", *TINY, f"data.train={tmp_path}/missing.txt", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"lmtrain pretrain: error: data.train: no such file or folder '{tmp_path}/missing.txt'"]


def test_bad_text_field_is_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": "hello there " * 20}) for _ in range(50)))
    result = lmtrain("pretrain", *TINY, f"data.train={data}", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("lmtrain pretrain: error: data.text_field:")
    assert "Traceback" not in result.stderr


def test_generate_without_checkpoint(tmp_path):
    result = lmtrain("generate", f"ckpt={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"lmtrain generate: error: ckpt: no complete checkpoint at '{tmp_path}'"
