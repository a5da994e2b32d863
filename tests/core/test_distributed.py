"""torch.distributed on CPU (gloo): 2 processes started by torchrun (trainer.nproc=2) inside the test."""

import os
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, lmtrain
from safetensors.torch import load_file

from lmtrain.train.sinks import read_metrics

STEPS = ["trainer.max_steps=6", "trainer.log_every=1", "trainer.checkpoint_every=3", "trainer.keep_last=0"]


def train(run_dir, corpus, *overrides, env=None):
    result = lmtrain("pretrain", *TINY, f"data.train={corpus}", *STEPS, *overrides, f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(path):
    return load_file(str(path / "model.safetensors"))


def assert_close(a, b, rtol=1e-5):
    for key in a:
        diff = (a[key] - b[key]).norm() / b[key].norm().clamp(min=1e-12)
        assert diff <= rtol, f"{key}: relative difference {diff:.2e}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    """1 process × micro-batch 4 × accumulation 2."""
    run_dir = tmp_path_factory.mktemp("single")
    train(run_dir, corpus, "trainer.micro_batch_size=4", "grad_accum.steps=2")
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp activation_checkpointing"])
def test_two_processes_equal_one_with_accumulation(tmp_path, corpus, single, strategy):
    name, _, checkpointing = strategy.partition(" ")
    train(
        tmp_path,
        corpus,
        "trainer.micro_batch_size=4",
        "grad_accum.steps=1",
        "trainer.nproc=2",
        f"trainer.strategy={name}",
        f"trainer.activation_checkpointing={bool(checkpointing)}",
    )
    assert_close(weights(tmp_path / "checkpoints" / "latest"), weights(single / "checkpoints" / "latest"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # written once, by one process
    expected = [r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(expected, rel=1e-5)
    assert not (tmp_path / ".hydra").joinpath("multirun.yaml").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_of_two_processes_resumes_in_one(tmp_path, corpus, single, strategy):
    train(tmp_path / "two", corpus, "trainer.micro_batch_size=4", "trainer.nproc=2", f"trainer.strategy={strategy}")
    step3 = tmp_path / "two" / "checkpoints" / "step_0000003"
    assert torch.equal(
        load_file(str(step3 / "rng.safetensors"))["sampler.generator"],
        load_file(str(single / "checkpoints" / "step_0000003" / "rng.safetensors"))["sampler.generator"],
    )
    train(tmp_path / "one", corpus, "trainer.micro_batch_size=4", "grad_accum.steps=2", f"trainer.resume={step3}")
    assert_close(weights(tmp_path / "one" / "checkpoints" / "latest"), weights(single / "checkpoints" / "latest"))


def test_muon_on_two_processes_equals_one_and_resumes_in_one(tmp_path, corpus):
    """optimizer=muon (Muon and AdamW behind one optimizer) under DDP: the same weights as one process with
    accumulation, and its checkpoint (both optimizers' state) resumes in one process to the same end. (FSDP,
    which shards the matrices Muon orthogonalises whole, is refused before the run starts.)"""
    muon = ["optimizer=muon", "trainer.micro_batch_size=4"]
    train(tmp_path / "single", corpus, *muon, "grad_accum.steps=2")
    train(tmp_path / "two", corpus, *muon, "trainer.nproc=2", "trainer.strategy=ddp")
    single = weights(tmp_path / "single" / "checkpoints" / "latest")
    assert_close(weights(tmp_path / "two" / "checkpoints" / "latest"), single)
    step3 = tmp_path / "two" / "checkpoints" / "step_0000003"
    train(tmp_path / "one", corpus, *muon, "grad_accum.steps=2", f"trainer.resume={step3}")
    assert_close(weights(tmp_path / "one" / "checkpoints" / "latest"), single)


def on_rank_1(tmp_path, code: str) -> dict:
    """The environment of a run whose rank 1 runs `code` as it starts (a sitecustomize on its PYTHONPATH)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    body = "".join(f"    {line}\n" for line in code.splitlines())
    (hook / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '1' and os.environ.get('LOCAL_RANK'):\n" + body
    )
    return {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def at_step_2(action: str) -> str:
    """Code that makes the trainer run `action` instead of its third optimizer step (state.step == 2)."""
    return (
        "from lmtrain.train import trainer\n"
        "real = trainer.Trainer.train_step\n"
        "def patched(self, batches):\n"
        "    if self.state.step == 2:\n"
        f"        {action}\n"
        "    return real(self, batches)\n"
        "trainer.Trainer.train_step = patched\n"
    )


def test_a_failing_rank_stops_the_run_and_is_named(tmp_path, corpus):
    env = on_rank_1(tmp_path, at_step_2("raise RuntimeError('injected failure')"))
    started = time.monotonic()
    result = lmtrain(
        "pretrain",
        *TINY,
        "trainer.max_steps=50",
        "trainer.nproc=2",
        "trainer.dist_timeout_s=30",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.train={corpus}",
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 90
    assert "lmtrain pretrain (rank 1): error: RuntimeError: injected failure" in result.stderr
    # the one line stands alone: the tracebacks go to the run's log file
    assert "Traceback" not in result.stderr, result.stderr
    assert "rank 1: Traceback" in (tmp_path / "run" / "pretrain.log").read_text()


def test_distributed_finetune_of_an_untied_model(tmp_path, corpus):
    """Classification never uses an untied LM head; DDP must not wait for its gradient."""
    import json
    import random

    train(tmp_path / "pre", corpus, "model.tie_embeddings=false", "trainer.max_steps=3")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(["red", "cat", "sat", "mat"]) for _ in range(4))} for _ in range(64)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({**r, "label": int("red" in r["text"])}) + "\n" for r in rows))
    result = lmtrain(
        "finetune",
        f"init_from={tmp_path / 'pre'}",
        "task=classification",
        f"data.train={data}",
        "epochs=1",
        "scheduler.warmup_steps=1",
        "trainer.nproc=2",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        f"hydra.run.dir={tmp_path / 'ft'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ft" / "result.json").read_text())["status"] == "completed"


def test_strategy_without_torchrun_is_one_process(tmp_path, corpus):
    train(tmp_path, corpus, "trainer.strategy=fsdp", "trainer.max_steps=2")
    assert (tmp_path / "checkpoints" / "latest" / "model.safetensors").is_file()


def test_a_rank_stuck_outside_the_collectives_times_out(tmp_path, corpus):
    """Rank 1 stops taking part without dying: rank 0's all-reduce gives up after trainer.dist_timeout_s."""
    env = on_rank_1(tmp_path, at_step_2("time.sleep(600)"))
    started = time.monotonic()
    result = lmtrain(
        "pretrain",
        *TINY,
        "trainer.max_steps=50",
        "trainer.nproc=2",
        "trainer.dist_timeout_s=10",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.train={corpus}",
        env=env,
        timeout=300,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    assert "lmtrain pretrain (rank 0): error:" in result.stderr


def test_a_rank_that_never_joins_fails_after_the_join_timeout(tmp_path, corpus):
    """Rank 1 hangs before it joins: rank 0 gives up after trainer.dist_join_timeout_s, not dist_timeout_s."""
    env = on_rank_1(tmp_path, "time.sleep(600)")
    started = time.monotonic()
    result = lmtrain(
        "pretrain",
        *TINY,
        "trainer.max_steps=5",
        "trainer.nproc=2",
        "trainer.dist_join_timeout_s=5",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.train={corpus}",
        env=env,
        timeout=300,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 90  # dist_timeout_s is 600
    assert "lmtrain pretrain (rank 0): error:" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def lora_finetune(base: Path, data: Path, run_dir: Path, *extra: str) -> dict:
    result = lmtrain(
        "finetune",
        f"init_from={base}",
        "task=lm",
        f"data.train={data}",
        "adapter=lora",
        "adapter.rank=4",
        "epochs=null",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=4",
        "scheduler.warmup_steps=1",
        "optimizer.lr=1e-2",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(run_dir / "checkpoints" / "latest")


@pytest.fixture(scope="module")
def lora_single(tmp_path_factory, corpus):
    """A tiny pretrained base, lm records, and its LoRA finetune on 1 process × accumulation 2."""
    import json

    root = tmp_path_factory.mktemp("lora")
    train(root / "pre", corpus, "trainer.max_steps=2")
    data = root / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus.read_text().splitlines()[:96]))
    return root / "pre", data, lora_finetune(root / "pre", data, root / "one", "grad_accum.steps=2")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_finetune_on_two_processes_equals_one_with_accumulation(tmp_path, lora_single, strategy):
    base, data, one = lora_single
    two = lora_finetune(base, data, tmp_path, "trainer.nproc=2", f"trainer.strategy={strategy}")
    assert set(one) == set(two) and all(".lora_" in k for k in one)  # the adapters alone
    assert_close(two, one)


def test_two_nodes_equal_one_process_and_one_writes_the_run_dir(tmp_path, corpus, single):
    """Multi-node on one machine: two torchrun agents (--nnodes=2, one process each) meet by c10d rendezvous on
    127.0.0.1 (gloo) and write one run dir on the "shared file system" (here: the same path)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "shared" / "run"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    agent += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", "-m", "lmtrain"]
    agent += ["pretrain", *TINY, f"data.train={corpus}", *STEPS, "trainer.micro_batch_size=4", "grad_accum.steps=1"]
    agent.append(f"hydra.run.dir={run_dir}")
    nodes = []
    for node in range(2):  # each "node" starts in its own folder: what it writes outside the run dir stays there
        (tmp_path / f"node{node}").mkdir()
        nodes.append(
            subprocess.Popen(agent, cwd=tmp_path / f"node{node}", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    for process in nodes:
        output = process.communicate(timeout=300)[0].decode()
        assert process.returncode == 0, output[-3000:]
    assert_close(weights(run_dir / "checkpoints" / "latest"), weights(single / "checkpoints" / "latest"))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "pretrain.log").read_text().count("done: ") == 1  # one process logs
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["run"]
    assert not any(any((tmp_path / f"node{node}").iterdir()) for node in range(2))
