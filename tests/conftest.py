import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# Packed token files of all tests share one cache, away from the user's.
os.environ.setdefault("LMTRAIN_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "lmtrain-tokens"))
os.environ.pop("LMTRAIN_DEBUG", None)
# Tiny models run faster on one thread, and `make test` runs two test processes (pytest-xdist) on 2 cores;
# subprocesses (the CLI, torchrun ranks) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SLOW_CALLS = ("lmtrain(", "lmtrain_many(", "subprocess.", "torchrun")


def pytest_collection_modifyitems(items):
    """Mark `slow` every test that starts processes (the real CLI, torchrun): `make test-fast` skips them."""
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if any(call in source for call in SLOW_CALLS) or item.module.__name__ == "test_distributed":
            item.add_marker(pytest.mark.slow)


WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()


def make_corpus(path: Path, sentences: int = 3000, seed: int = 0) -> Path:
    """Tiny, learnable text: short sentences from a small vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        a, b = rng.choice(WORDS[:2]), rng.choice(WORDS[2:4])
        lines.append(f"{a} {rng.choice(WORDS[10:14])} {b} {rng.choice(WORDS[4:6])} {rng.choice(WORDS[6:8])} the mat.")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


# Fast settings shared by tests that train: tiny model, char tokens, a few steps.
TINY = [
    "model=tiny",
    "model.max_seq_len=32",
    "data.tokenizer=char",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.eval_batches=2",
    "trainer.log_every=1",
    "trainer.checkpoint_every=3",
    "trainer.progress_bar=false",
    "scheduler.warmup_steps=2",
    "trainer.device=cpu",
]


def prepare_tokens(cache_dir: Path, train, **settings):
    """tokens.prepare on `train` with the schema's data defaults, a char tokenizer and `settings` over them
    (`existing`, `end_of_text` go to prepare itself)."""
    from lmtrain.config import DataConfig
    from lmtrain.data import tokens

    given = {k: settings.pop(k) for k in ("existing", "end_of_text") if k in settings}
    data = DataConfig(**{"train": str(train), "tokenizer": "char", "vocab_size": 300, **settings})
    data.cache_dir = str(cache_dir)
    return tokens.prepare(**tokens.corpus_settings(data), **given)


def assert_resume_is_exact(run, root: Path, monkeypatch, kill_after: int, checkpoint_at: str, files=None):
    """`run(run_dir, *overrides)` trains a run; `root/"straight"` already holds it uninterrupted. The run is
    killed after step `kill_after` (its newest checkpoint: `checkpoint_at`) and resumed with
    trainer.resume=true: its `files` (default model.safetensors) must equal the straight run's bitwise, and
    its metrics.jsonl records too, the measured speed aside."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from lmtrain.checkpoint import files as checkpoint
    from lmtrain.train.trainer import Trainer

    real_step = Trainer.train_step

    def killed(self, batches):
        if self.state.step == kill_after:
            raise KeyboardInterrupt  # the process dies after this step was logged
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run(root / "resumed")
    assert checkpoint.resolve(root / "resumed").name == checkpoint_at
    monkeypatch.setattr(Trainer, "train_step", real_step)
    run(root / "resumed", "trainer.resume=true")
    for file in files or ["model.safetensors"]:
        a, b = (load_file(str(checkpoint.resolve(root / run) / file)) for run in ("straight", "resumed"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{file}: {key}"
    assert without_speed(root / "straight") == without_speed(root / "resumed")


def without_speed(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records without what the clock measures (tokens/s, MFU)."""
    from lmtrain.train.sinks import read_metrics

    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def compose(*overrides: str):
    """The typed config the CLI would build for `lmtrain pretrain <overrides>`."""
    from lmtrain.cli import check
    from lmtrain.config import PretrainConfig

    return check("pretrain", PretrainConfig, list(overrides))


def lmtrain(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "lmtrain", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, corpus):
    """A tiny char-level pretrained run and a classifier finetuned from it (in-process, a few seconds):
    {"lm": run dir, "classifier": run dir, "classification": train file}."""
    from lmtrain.cli import check
    from lmtrain.commands import finetune, pretrain
    from lmtrain.config import FinetuneConfig, PretrainConfig

    root = tmp_path_factory.mktemp("tiny_runs")
    lm = root / "lm"
    pretrain.run(check("pretrain", PretrainConfig, [*TINY, f"data.train={corpus}"]), str(lm))
    rng = random.Random(0)
    records = []
    for _ in range(40):
        words = [rng.choice(WORDS) for _ in range(4)]
        records.append({"text": " ".join(words), "label": int("red" in words)})
    train = write_jsonl(root / "classification.jsonl", records)
    classifier = root / "classifier"
    overrides = [f"init_from={lm}", f"data.train={train}", "epochs=null", "trainer.max_steps=2"]
    overrides += ["trainer.micro_batch_size=8", "trainer.eval_every=2", "trainer.checkpoint_every=2"]
    overrides += ["trainer.device=cpu", "trainer.progress_bar=false"]
    finetune.run(check("finetune", FinetuneConfig, overrides), str(classifier))
    return {"lm": lm, "classifier": classifier, "classification": train, "root": root}


def lmtrain_many(cases: list[list[str]], cwd: Path) -> list[dict]:
    """Run many command lines through the real CLI (tests/fork_cli.py): [{"rc", "stdout", "stderr"}]."""
    import json

    runner = Path(__file__).parent / "fork_cli.py"
    result = subprocess.run(
        [sys.executable, str(runner)], input=json.dumps(cases), capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_runs) -> Path:
    """A tiny char-level model pretrained for a few steps (in this process): its `checkpoints/latest`."""
    return tiny_runs["lm"] / "checkpoints" / "latest"
