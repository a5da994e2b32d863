"""`lmtrain <command> [overrides]`: checks the config, then hands the command to its Hydra entry point.

The check composes the config with Hydra's compose API and validates it against the typed schema,
so a user mistake is one line and a non-zero exit before torch is even imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtrain import torchrun
from lmtrain.config import SCHEMAS, ConfigError, PretrainConfig, all_keys, nearest, validate
from lmtrain.config.compose import (
    CONFIG_PACKAGE,
    check,
    check_run_dir,
    explicit_keys,
    first_line,
    first_values,
    group_options,
    literal_strings,
    name_options,
    section_paths,
)
from lmtrain.config.paths import check_paths
from lmtrain.core.errors import RunRefused, UserError

log = logging.getLogger("lmtrain")
TRAINING_COMMANDS = {"pretrain", "finetune"}  # commands whose runs record result.json
# command -> (primary config, schema); lmtrain.commands.<command>.run(cfg, run_dir) does the work
COMMANDS: dict[str, tuple[str, type]] = {name: (name, schema) for name, schema in SCHEMAS.items()}
COMMANDS["prepare"] = ("prepare", PretrainConfig)  # pretrain's config, its data part only
USAGE = """usage: lmtrain <command> [hydra flags] [key=value ...]

commands:
  pretrain   train a causal LM from scratch            (configs/pretrain.yaml)
  prepare    tokenize pretrain's corpus into token shards, once; resumable   (configs/prepare.yaml)
  finetune   adapt a checkpoint to a task              (configs/finetune.yaml)
  evaluate   score a checkpoint on a split or a benchmark suite: eval.json  (configs/evaluate.yaml, docs/benchmarks.md)
  generate   sample text from a checkpoint             (configs/generate.yaml)
  predict    classify text with a checkpoint           (configs/predict.yaml)
  export     weights for inference: bf16/fp16/int8     (configs/export.yaml)
  report     compare runs or a sweep: table and plots  (lmtrain report --help)
  plan       a run's parameters, FLOPs, memory and time, before training   (lmtrain plan --help)
  inspect    per-token loss, attention maps, logit lens of a checkpoint   (configs/inspect.yaml)
  launch     a Slurm or SkyPilot job file for a multi-node run   (lmtrain launch slurm nodes=2 -- pretrain ...)

Hydra's flags work after the command: --help, --cfg job, --info, -m (multirun), hydra.run.dir=...
Examples:
  lmtrain pretrain model=tiny trainer.max_steps=200
  lmtrain pretrain --cfg job
  lmtrain generate ckpt=outputs/<run>/checkpoints/latest prompt="def "
  lmtrain report multirun/<date>/<time>
  lmtrain plan model=gpt2_124m trainer=gpu --device h100
  lmtrain inspect ckpt=outputs/<run>/checkpoints/latest 'text="To be, or not to be"'
"""


def _fail(command: str, error: Exception) -> int:
    for line in str(error).splitlines():
        print(f"lmtrain {command}: error: {line}", file=sys.stderr)
    return 2


def _help(command: str, config_name: str, schema: type, words: list[str]) -> str:
    """`lmtrain <command> --help [group ...] [overrides]`: groups and options, then every key's type, value
    (with the overrides applied) and doc."""
    from hydra import compose, initialize_config_module

    from lmtrain.config.docs import help_text

    overrides = [w for w in words if "=" in w]
    only = [w for w in words if "=" not in w]
    cfg = check(config_name, schema, overrides, check_values=False)
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        chosen = compose(config_name, overrides=overrides, return_hydra_config=True).hydra.runtime.choices
    groups = {g: group_options(g) or [] for g in chosen if "/" not in g}
    unknown = [g for g in only if g not in groups and g not in {f.split(".")[0] for f in all_keys(schema)}]
    if unknown:
        raise ConfigError(f"--help {unknown[0]}: no such group or key; choose from {', '.join(sorted(groups))}")
    return help_text(command, schema, cfg, groups, dict(chosen), only)


@dataclass
class _Job:
    """One Hydra job of a command: where it writes, and how its errors are named and reported."""

    command: str
    run_dir: Path
    rank: int
    name: str  # the command, with the rank under torchrun
    sweeping: bool
    number: int | None  # the job's number in a sweep
    overrides: list[str]
    started: float  # time.time() at the start

    @classmethod
    def current(cls, command: str) -> _Job:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from lmtrain.core import distributed

        hydra_cfg = HydraConfig.get()
        rank = distributed.torchrun_rank()
        name = command if distributed.torchrun_world_size() == 1 else f"{command} (rank {rank})"
        sweeping = hydra_cfg.mode == RunMode.MULTIRUN
        overrides = list(hydra_cfg.overrides.task)
        number = hydra_cfg.job.num if sweeping else None
        return cls(command, Path(hydra_cfg.runtime.output_dir), rank, name, sweeping, number, overrides, time.time())

    def record(self, status: str, values: dict) -> None:
        """Write `result.json` with the job's wall time; raises UserError when it cannot be written."""
        from lmtrain.train.sweep import write_result

        write_result(self.run_dir, status, {**values, "wall_seconds": time.time() - self.started}, self.overrides)

    def report(self, err: Exception) -> float:
        """Print `err` as one line: a sweep goes on with this job's objective NaN, a single run exits."""
        if self.sweeping:
            _fail(f"{self.command} (job {self.number})", err)
            return float("nan")
        sys.exit(_fail(self.name, err))


def _task(command: str, schema: type):
    """The Hydra job: validate, run the command, and record `result.json` for commands that train.

    In a sweep a failing job is recorded as failed and the sweep goes on (the sweep's exit status says
    so at the end); in a single run a user mistake exits with one line, and a bug keeps its traceback.
    """

    def run(cfg) -> Any:
        from hydra.core.hydra_config import HydraConfig

        from lmtrain.core import distributed

        job = _Job.current(command)
        try:
            name_options(cfg, HydraConfig.get().runtime.choices)
            typed = validate(cfg, schema, explicit=explicit_keys(job.overrides))
            check_paths(typed)
            summary = importlib.import_module(f"lmtrain.commands.{command}").run(typed, str(job.run_dir))
        except Exception as err:
            return _failed(job, err)
        finally:
            distributed.shutdown()
        if summary is None:
            return None
        if job.rank == 0:
            try:
                job.record("completed", summary)
            except UserError as err:
                return job.report(err)
        return summary["objective"]

    return run


def _failed(job: _Job, err: Exception) -> float:
    """Record a training job's failure in `result.json`, then report it: one line for a user mistake or a sweep's
    job, the traceback for a bug (and always under LMTRAIN_DEBUG)."""
    from lmtrain.core import distributed

    _outcome["refused"] = isinstance(err, RunRefused)
    if job.command in TRAINING_COMMANDS and job.rank == 0 and not isinstance(err, RunRefused):
        reason = first_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {first_line(err)}"
        try:
            job.record("failed", {"error": reason})
        except UserError as unwritten:  # a full disk: say so, then report the failure itself
            _fail(job.name, unwritten)
    if distributed.torchrun_world_size() > 1 and not os.environ.get("LMTRAIN_DEBUG"):
        torchrun.rank_failed(job.name, job.run_dir / f"{job.command}.log", job.rank, err)
    if os.environ.get("LMTRAIN_DEBUG") or not (job.sweeping or isinstance(err, UserError)):
        raise err
    if job.sweeping and not isinstance(err, UserError):
        log.exception("job %s failed", job.number)
    return job.report(err)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "report":  # reads finished runs: no Hydra config of its own
        from lmtrain.commands.report import main as report

        return report(rest)
    if command == "plan":  # composes pretrain's or finetune's config; no run of its own
        from lmtrain.commands.plan import main as plan

        return plan(rest, check)
    if command == "launch":  # writes a cluster job file for pretrain or finetune
        from lmtrain.commands.launch import main as launch

        return launch(rest, check)
    if command not in COMMANDS:
        hint = nearest(command, [*COMMANDS, "report", "plan", "launch"])
        print(
            f"lmtrain: error: unknown command '{command}'" + (f" (did you mean '{hint}'?)" if hint else ""),
            file=sys.stderr,
        )
        print(USAGE, file=sys.stderr)
        return 2
    return _run_command(command, rest)


def _run_command(command: str, rest: list[str]) -> int:
    """Check the config (one line per mistake), start torchrun when trainer.nproc asks, then run Hydra."""
    from hydra._internal.utils import get_args_parser

    config_name, schema = COMMANDS[command]
    rest = section_paths(schema, rest)
    args = get_args_parser().parse_args(rest)
    if args.overrides:  # string values as typed, here and in the torchrun relaunch
        given = set(args.overrides)
        args.overrides = literal_strings(schema, args.overrides, args.multirun)
        quoted = iter(args.overrides)
        rest = [next(quoted) if item in given else item for item in rest]
    if args.help:
        try:
            print(_help(command, config_name, schema, args.overrides))
        except UserError as err:
            return _fail(command, err)
        return 0
    if args.hydra_help or args.info or args.shell_completion:
        return _run_hydra(command, config_name, schema, rest)
    try:
        typed = _checked(config_name, schema, args)
        nproc = getattr(getattr(typed, "trainer", None), "nproc", 1)
        if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not args.cfg:
            return torchrun.relaunch(nproc, [command, *rest])
    except UserError as err:
        if os.environ.get("LMTRAIN_DEBUG"):
            raise
        return _fail(command, err)
    hydra_options = (
        args.multirun,
        args.cfg,
        args.config_path,
        args.config_name,
        args.config_dir,
        args.experimental_rerun,
    )
    if command == "prepare" and not any(hydra_options) and not any(o.startswith("hydra") for o in args.overrides):
        return _prepare(typed)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.multirun:
        if command not in TRAINING_COMMANDS:  # evaluate, generate, ...: the main process does the work
            return 0 if int(os.environ.get("RANK", "0")) > 0 else _run_hydra(command, config_name, schema, rest)
        try:
            rest = [*rest, *torchrun.shared_run_dir(command, args.overrides, typed.trainer)]
        except UserError as err:
            return _fail(f"{command} (rank {os.environ.get('RANK', '0')})", err)
    with _hydra_files_kept_if_refused(command, args.overrides, args.multirun):
        return _run_hydra(command, config_name, schema, rest)


_outcome = {"refused": False}  # set when a training command refuses to start (RunRefused)


@contextlib.contextmanager
def _hydra_files_kept_if_refused(command: str, overrides: list[str], multirun: bool) -> Iterator[None]:
    """Hydra rewrites the run dir's `.hydra/` before the command runs; a refused command must leave the run dir
    as it was. The old folder is renamed aside for the run, and renamed back if the command refuses (else
    removed)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    old = Path(given[-1]).expanduser() / ".hydra" if given else None
    rank = int(os.environ.get("RANK", "0"))
    if command not in TRAINING_COMMANDS or multirun or rank > 0 or old is None or not old.is_dir() or old.is_symlink():
        yield
        return
    kept = old.with_name(f".hydra.kept-{os.getpid()}")
    os.rename(old, kept)
    _outcome["refused"] = False
    try:
        yield
    finally:
        if _outcome["refused"]:
            shutil.rmtree(old, ignore_errors=True)
            os.rename(kept, old)
        else:
            shutil.rmtree(kept, ignore_errors=True)


def _prepare(typed: PretrainConfig) -> int:
    """`lmtrain prepare`: no run dir and no job of its own, so no Hydra run (a second composition of the
    config); log lines go to stdout."""
    from lmtrain.commands import prepare

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[%(asctime)s][%(levelname)s] - %(message)s")
    try:
        prepare.run(typed, ".")
    except UserError as err:
        if os.environ.get("LMTRAIN_DEBUG"):
            raise
        return _fail("prepare", err)
    return 0


def _checked(config_name: str, schema: type, args: Any) -> Any:
    """The typed config (None for a sweep, whose jobs check their own values); raises UserError."""
    if args.multirun:
        first = check(config_name, schema, first_values(args.overrides), check_values=False)
        try:  # paths no job can use fail the sweep here; values are each job's own to check
            check_paths(validate(first, schema))
        except ConfigError:
            pass
        return None
    typed = check(config_name, schema, args.overrides)
    check_paths(typed)
    check_run_dir(args.overrides)
    return typed


def _run_hydra(command: str, config_name: str, schema: type, rest: list[str]) -> int:

    import hydra

    entry = hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name=config_name, version_base="1.3")
    saved_argv = sys.argv
    sys.argv = [f"lmtrain {command}", *rest]
    try:
        entry(_task(command, schema))()
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":
    sys.exit(main())
