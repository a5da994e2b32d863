import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# Packed token files of all tests share one cache, away from the user's.
os.environ.setdefault("LMTRAIN_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "lmtrain-tokens"))
os.environ.pop("LMTRAIN_DEBUG", None)

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, corpus) -> Path:
    """A tiny char-level model pretrained for a few steps (in this process): its `checkpoints/latest`."""
    from lmtrain.commands import pretrain

    run_dir = tmp_path_factory.mktemp("tiny-run")
    pretrain.run(compose(*TINY, f"data.train={corpus}"), str(run_dir))
    return run_dir / "checkpoints" / "latest"
