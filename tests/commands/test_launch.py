"""`lmtrain launch`: the job files it writes, and the Slurm script run end to end on this machine as two nodes
(fake `srun` and `scontrol` start two torchrun agents that meet by c10d rendezvous on 127.0.0.1)."""

import os
import socket
import subprocess

import pytest
import torch
from conftest import TINY, compose, lmtrain
from safetensors.torch import load_file

from lmtrain.checkpoint import files as checkpoint
from lmtrain.commands import pretrain
from lmtrain.commands.launch import parse
from lmtrain.core.errors import UserError

STEPS = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=2"]


def test_a_slurm_script_run_as_two_nodes_equals_one_process(tmp_path, corpus):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script, run_dir = tmp_path / "job.sbatch", tmp_path / "shared" / "run"
    training = ["pretrain", *TINY, *STEPS, f"data.train={corpus}", "trainer.micro_batch_size=4", "grad_accum.steps=1"]
    settings = ["nodes=2", "gpus_per_node=1", f"run_dir={run_dir}", f"port={port}", f"out={script}"]
    result = lmtrain("launch", "slurm", *settings, "--", *training, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --requeue" in text
    assert f"hydra.run.dir={run_dir} trainer.resume=true" in text

    bin_dir = tmp_path / "bin"  # a two-node allocation on this machine: srun starts the task on each node
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n")
    srun = 'for node in 0 1; do mkdir -p node$node; (cd node$node && "$@") & done\nwait -n && wait -n\n'
    (bin_dir / "srun").write_text("#!/bin/bash\nshift\n" + srun)
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]"}
    env.update(SLURM_NNODES="2", SLURM_JOB_ID="4242")
    job = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]

    single = tmp_path / "single"  # one process, micro-batch 4 × 2 accumulation: the same global batch
    pretrain.run(
        compose(*TINY, *STEPS, f"data.train={corpus}", "trainer.micro_batch_size=4", "grad_accum.steps=2"), str(single)
    )
    two, one = (load_file(str(checkpoint.resolve(d) / "model.safetensors")) for d in (run_dir, single))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


def test_a_skypilot_task_starts_torchrun_on_every_node_and_resumes(tmp_path, corpus):
    out = tmp_path / "job.yaml"
    training = ["finetune", "init_from=outputs/x", "data.train=train.jsonl"]
    result = lmtrain(
        "launch",
        "skypilot",
        "nodes=4",
        "gpus_per_node=8",
        f"out={out}",
        "--",
        "pretrain",
        f"data.train={corpus}",
        "model=gpt2_124m",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    import yaml

    task = yaml.safe_load(out.read_text())
    assert task["num_nodes"] == 4 and task["resources"]["accelerators"] == "H100:8"
    run = task["run"]
    assert "--nnodes=$SKYPILOT_NUM_NODES --nproc_per_node=8" in run and "-m lmtrain pretrain" in run
    assert f"hydra.run.dir={tmp_path / 'outputs' / 'lmtrain-pretrain'} trainer.resume=true" in run
    bad = lmtrain("launch", "skypilot", "nodes=2", "--", *training, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("lmtrain launch: error: ")  # the command is checked first


@pytest.mark.parametrize(
    "argv, message",
    [
        (["slurm", "nodes=2", "pretrain"], "usage: lmtrain launch"),
        (["slurm", "nodes=two", "--", "pretrain"], "launch: nodes: expected int, got 'two'"),
        (["slurm", "nodes=0", "--", "pretrain"], "launch: nodes: must be >= 1, got 0"),
        (["slurm", "gpus=8", "--", "pretrain"], "launch: unknown setting 'gpus=8'"),
        (["slurm", "--", "generate"], "launch: after -- give the training command, pretrain or finetune"),
        (["slurm", "--", "pretrain", "trainer.nproc=2"], "launch: the job sets hydra.run.dir"),
    ],
)
def test_bad_launch_settings_are_one_line(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse(argv)
