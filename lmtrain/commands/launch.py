"""`lmtrain launch slurm|skypilot [key=value ...] -- <pretrain|finetune> [overrides]`: a multi-node job file that
starts torchrun on every node (c10d rendezvous on the first node), trains in a run dir on shared storage and
passes `trainer.resume=true`, so a requeued or preempted job continues exactly where its last checkpoint left
it. `submit=true` hands the file to the scheduler (`sbatch`, `sky jobs launch`) when its command is on PATH.

Never imports torch: the training command's config is checked as `lmtrain <command>` checks it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lmtrain.core.errors import UserError

TRAINING = ("pretrain", "finetune")
USAGE = (
    "usage: lmtrain launch slurm|skypilot [nodes=N gpus_per_node=G run_dir=... job_name=... port=29500 out=FILE "
    "submit=false partition=... time=HH:MM:SS account=... accelerators=H100:8] -- <pretrain|finetune> [overrides]"
)


@dataclass
class Launch:
    nodes: int = 1  # machines
    gpus_per_node: int = 1  # processes per machine (torchrun --nproc_per_node)
    run_dir: str | None = None  # on storage every node sees (null: ./outputs/<job_name>, made absolute)
    job_name: str | None = None  # null: lmtrain-<command>
    port: int = 29500  # the rendezvous port on the first node
    out: str | None = None  # the file written (null: <job_name>.sbatch / <job_name>.sky.yaml)
    submit: bool = False  # run sbatch / sky jobs launch on it
    python: str = sys.executable  # the interpreter on the nodes (a shared environment)
    partition: str | None = None  # slurm
    time: str | None = None  # slurm: the job's time limit
    account: str | None = None  # slurm
    accelerators: str | None = None  # skypilot (null: H100:<gpus_per_node>)


def parse(argv: list[str]) -> tuple[str, Launch, str, list[str]]:
    """(scheduler, settings, training command, its overrides) from the command line; UserError on a mistake."""
    if "--" not in argv or not argv or argv[0] not in ("slurm", "skypilot"):
        raise UserError(USAGE)
    split = argv.index("--")
    scheduler, settings, training = argv[0], argv[1:split], argv[split + 1 :]
    if not training or training[0] not in TRAINING:
        raise UserError(f"launch: after -- give the training command, pretrain or finetune; got {training[:1]}")
    types = {f.name: f.type for f in fields(Launch)}
    values: dict[str, Any] = {}
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise UserError(f"launch: unknown setting '{item}'; settings: {', '.join(types)}")
        kind = types[key]
        try:
            if "int" in str(kind):
                values[key] = int(value)
            elif "bool" in str(kind):
                values[key] = {"true": True, "false": False}[value.lower()]
            else:
                values[key] = value
        except (ValueError, KeyError):
            raise UserError(f"launch: {key}: expected {kind}, got '{value}'") from None
    launch = Launch(**values)
    for key in ("nodes", "gpus_per_node", "port"):
        if getattr(launch, key) < 1:
            raise UserError(f"launch: {key}: must be >= 1, got {getattr(launch, key)}")
    if any(o.startswith(("hydra.run.dir=", "trainer.resume=", "trainer.nproc=")) for o in training[1:]):
        raise UserError("launch: the job sets hydra.run.dir, trainer.resume and the processes; use run_dir= instead")
    return scheduler, launch, training[0], training[1:]


def node_command(launch: Launch, command: str, overrides: list[str], run_dir: Path, nodes: str, rdzv_id: str) -> str:
    """The line every node runs: torchrun meeting the others at $MASTER_ADDR:$MASTER_PORT, then lmtrain."""
    words = [
        launch.python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={launch.gpus_per_node}",
        "--rdzv_backend=c10d", "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT", f"--rdzv_id={rdzv_id}",
        "-m", "lmtrain", command, *overrides, f"hydra.run.dir={run_dir}", "trainer.resume=true",
    ]  # fmt: skip
    return " ".join(w if "$" in w else shlex.quote(w) for w in words)


def slurm(launch: Launch, command: str, overrides: list[str], run_dir: Path, name: str) -> str:
    """An sbatch script: one task per node, each running torchrun; requeued jobs resume from the run dir."""
    options = [
        f"--job-name={name}", f"--nodes={launch.nodes}", "--ntasks-per-node=1",
        f"--gpus-per-node={launch.gpus_per_node}", f"--output={run_dir}/slurm-%j.out", "--requeue",
        "--open-mode=append",
    ]  # fmt: skip
    options += [f"--{key}={getattr(launch, key)}" for key in ("partition", "time", "account") if getattr(launch, key)]
    line = node_command(launch, command, overrides, run_dir, "$SLURM_NNODES", "$SLURM_JOB_ID")
    return "\n".join(
        [
            "#!/bin/bash",
            *(f"#SBATCH {option}" for option in options),
            "# written by `lmtrain launch slurm`: a requeued job continues from the run dir's latest checkpoint",
            "set -euo pipefail",
            f"mkdir -p {shlex.quote(str(run_dir))}",
            'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            f"export MASTER_PORT={launch.port}",
            f"srun --kill-on-bad-exit=1 {line}",
            "",
        ]
    )


def skypilot(launch: Launch, command: str, overrides: list[str], run_dir: Path, name: str) -> str:
    """A SkyPilot task: `num_nodes` machines; the first node's IP is the rendezvous; managed jobs
    (`sky jobs launch`) recover from preemption and resume from the run dir."""
    line = node_command(launch, command, overrides, run_dir, "$SKYPILOT_NUM_NODES", name)
    run = "\n".join(
        [
            'export MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n 1)"',
            f"export MASTER_PORT={launch.port}",
            f"mkdir -p {shlex.quote(str(run_dir))}",
            line,
        ]
    )
    accelerators = launch.accelerators or f"H100:{launch.gpus_per_node}"
    indented = "\n".join("  " + text for text in run.splitlines())
    return (
        f"# written by `lmtrain launch skypilot`: a recovered job continues from the run dir's latest checkpoint\n"
        f"name: {name}\nnum_nodes: {launch.nodes}\nresources:\n  accelerators: {accelerators}\n"
        f"workdir: .\nrun: |\n{indented}\n"
    )


def main(argv: list[str], check) -> int:
    """`check(config_name, schema, overrides)` validates the training command as the CLI does (lmtrain.cli.check)."""
    try:
        scheduler, launch, command, overrides = parse(argv)
        from lmtrain.config import SCHEMAS
        from lmtrain.config.paths import check_paths

        check_paths(check(command, SCHEMAS[command], overrides))  # paths as this (login) node sees the shared storage
        name = launch.job_name or f"lmtrain-{command}"
        run_dir = Path(launch.run_dir or f"outputs/{name}").expanduser().absolute()
        render = slurm if scheduler == "slurm" else skypilot
        text = render(launch, command, overrides, run_dir, name)
        out = Path(launch.out or (f"{name}.sbatch" if scheduler == "slurm" else f"{name}.sky.yaml"))
        try:
            out.write_text(text)
        except OSError as err:
            raise UserError(f"launch: cannot write '{out}': {err.strerror}") from None
        print(f"wrote {out} ({launch.nodes} node(s) × {launch.gpus_per_node} process(es), run dir {run_dir})")
        if launch.submit:
            submit = ["sbatch", str(out)] if scheduler == "slurm" else ["sky", "jobs", "launch", "-y", str(out)]
            if shutil.which(submit[0]) is None:
                raise UserError(f"launch: submit=true needs {submit[0]} on PATH; submit {out} where it is")
            return subprocess.run(submit).returncode
    except UserError as err:
        print(f"lmtrain launch: error: {err}", file=sys.stderr)
        return 2
    return 0
