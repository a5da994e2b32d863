"""`lmtrain <command> [overrides]`: checks the config, then hands the command to its Hydra entry point.

The check composes the config with Hydra's compose API and validates it against the typed schema,
so a user mistake is one line and a non-zero exit before torch is even imported.
"""

from __future__ import annotations

import importlib
import importlib.resources
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lmtrain.config import (
    CHOICES,
    ConfigError,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    InspectConfig,
    PredictConfig,
    PretrainConfig,
    all_keys,
    nearest,
    string_keys,
    validate,
)
from lmtrain.config.paths import check_out_folder, check_paths
from lmtrain.errors import RunRefused, UserError

log = logging.getLogger("lmtrain")
CONFIG_PACKAGE = "lmtrain.configs"
TRAINING_COMMANDS = {"pretrain", "finetune"}  # commands whose runs record result.json
# command -> (primary config, schema); lmtrain.commands.<command>.run(cfg, run_dir) does the work
COMMANDS: dict[str, tuple[str, type]] = {
    "pretrain": ("pretrain", PretrainConfig),
    "prepare": ("prepare", PretrainConfig),
    "finetune": ("finetune", FinetuneConfig),
    "evaluate": ("evaluate", EvaluateConfig),
    "generate": ("generate", GenerateConfig),
    "predict": ("predict", PredictConfig),
    "export": ("export", ExportConfig),
    "inspect": ("inspect", InspectConfig),
}
USAGE = """usage: lmtrain <command> [hydra flags] [key=value ...]

commands:
  pretrain   train a causal LM from scratch            (configs/pretrain.yaml)
  prepare    tokenize pretrain's corpus into token shards, once; resumable   (configs/prepare.yaml)
  finetune   adapt a checkpoint to a task              (configs/finetune.yaml)
  evaluate   score a checkpoint on a split: eval.json  (configs/evaluate.yaml)
  generate   sample text from a checkpoint             (configs/generate.yaml)
  predict    classify text with a checkpoint           (configs/predict.yaml)
  export     weights for inference: bf16/fp16/int8     (configs/export.yaml)
  report     compare runs or a sweep: table and plots  (lmtrain report --help)
  plan       a run's parameters, FLOPs, memory and time, before training   (lmtrain plan --help)
  inspect    per-token loss, attention maps, logit lens of a checkpoint   (configs/inspect.yaml)

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


def _group_options(group: str) -> list[str] | None:
    folder = importlib.resources.files(CONFIG_PACKAGE) / group
    if not folder.is_dir():
        return None
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _no_such_option(key: str, value: str, options: list[str]) -> ConfigError:
    hint = nearest(value, options)
    return ConfigError(
        f"{key}={value}: no such option; choose from {', '.join(options)}"
        + (f" (did you mean '{hint}'?)" if hint else "")
    )


def _first_values(overrides: list[str]) -> list[str]:
    """Replace each sweep (`a=1,2`, `glob(*)`, `range(1,4)`, `interval(0,1)`, `tag(...)`) by its first value so
    one job of a multirun can be checked; every option a group sweep names must exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(_first_line(err)) from None
    checked = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        options = _group_options(key) if "." not in key else None
        if key == "trainer.nproc" and override.is_sweep_override():
            raise ConfigError("trainer.nproc: a -m sweep runs its jobs in this process; start them with torchrun")
        if not override.is_sweep_override():
            checked.append(override.input_line)
            continue
        if isinstance(override.value(), Glob):
            if options is None:
                raise ConfigError(f"{key}: glob(...) sweeps the options of a config group; list values instead")
            values = override.value().filter(options)
            if not values:
                raise ConfigError(f"{key}: {override.input_line.split('=', 1)[1]} matches none of {', '.join(options)}")
        elif override.is_discrete_sweep():
            values = list(override.sweep_string_iterator())
        else:  # interval(a, b): its lower end stands for the job
            if not any(o.lstrip("+").startswith(("hydra/sweeper=", "search=")) for o in overrides):
                raise ConfigError(
                    f"{key}: interval(...) is searched by a sweeper such as Optuna: add +search=optuna "
                    "(make setup-optuna), or list values: a,b,c"
                )
            values = [str(override.value().start)]
        for value in values if options is not None else []:
            if value not in options:
                raise _no_such_option(key, value, options)
        checked.append(f"{override.get_key_element()}={values[0]}")
    return checked


def check(config_name: str, schema: type, overrides: list[str], check_values: bool = True) -> Any:
    """Compose and validate the config as Hydra will; raises ConfigError naming the key to fix.

    check_values=False checks keys and group options only (for a sweep, whose jobs check their own values).
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    groups, values = [], []
    for override in overrides:
        key = override.split("=", 1)[0]
        bare = key.lstrip("+~")
        if bare.startswith("hydra.") or bare.startswith("hydra/"):
            continue
        (groups if "." not in bare and _group_options(bare) is not None else values).append(override)
    for override in groups:
        key, _, value = override.partition("=")
        options = _group_options(key.lstrip("+~"))
        if value and value not in options:
            raise _no_such_option(key.lstrip("+~"), value, options)
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        try:
            base = compose(config_name, overrides=groups)
        except HydraException as err:
            raise ConfigError(_plugin_hint(_first_line(err))) from None
        known = all_keys(base)
        for override in values:
            key = override.split("=", 1)[0]
            if key.startswith(("+", "~")) or OmegaConf.select(base, key, default=_MISSING) is not _MISSING:
                continue
            parent, _, leaf = key.rpartition(".")
            siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
            hint = nearest(leaf, siblings) if siblings else nearest(key, known)
            if hint and siblings:
                hint = f"{parent}.{hint}" if parent else hint
            raise ConfigError(f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        try:
            cfg = compose(config_name, overrides=groups + values)
        except HydraException as err:
            raise ConfigError(_first_line(err)) from None
    return validate(cfg, schema, explicit=_keys(values)) if check_values else cfg


def _keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def literal_strings(schema: type, overrides: list[str], multirun: bool) -> list[str]:
    """Quote the value of each string-typed key for Hydra, so it arrives as typed: `prompt=def ` keeps its
    space, `text=1_000` stays the text 1_000. Left alone: values already quoted, null, interpolations `${..}`,
    keys with a fixed set of choices, and in a multirun anything that may be a sweep (`a,b`, `glob(...)`)."""
    keys = string_keys(schema)
    quoted = []
    for override in overrides:
        key, eq, value = override.partition("=")
        bare = key.lstrip("+")
        untouched = (
            not eq
            or bare not in keys
            or bare in CHOICES
            or value[:1] in ("'", '"')
            or value == "null"
            or "${" in value
            or multirun
            and ("," in value or re.match(r"^\w+\(", value))
        )
        quoted.append(override if untouched else f"{key}={_hydra_quote(value)}")
    return quoted


def _hydra_quote(value: str) -> str:
    """A Hydra single-quoted string: backslashes before a quote or at the end doubled, quotes escaped."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def check_run_dir(overrides: list[str]) -> None:
    """hydra.run.dir must be a folder lmtrain can create or write in."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "hydra.run.dir" and value and (problem := check_out_folder(key, value)):
            raise ConfigError(problem)


_MISSING = object()


PLUGINS = {"hydra/sweeper/optuna": "optuna", "hydra/launcher/joblib": "joblib"}


def _plugin_hint(message: str) -> str:
    for config, extra in PLUGINS.items():
        if f"'{config}'" in message:
            return f"{config} is not installed: pip install 'lmtrain[{extra}]' (or make setup-{extra})"
    return message


def _first_line(err: BaseException) -> str:
    from hydra.errors import OverrideParseException

    if isinstance(err, OverrideParseException):
        key = err.override.split("=", 1)[0]
        return (
            f"cannot parse override '{err.override}': {err.message.splitlines()[0]}; "
            f"quote a value with spaces or symbols: '{key}=\"...\"'"
        )
    while not str(err).strip() and err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _task(command: str, schema: type):
    """The Hydra job: validate, run the command, and record `result.json` for commands that train.

    In a sweep a failing job is recorded as failed and the sweep goes on (the sweep's exit status says
    so at the end); in a single run a user mistake exits with one line, and a bug keeps its traceback.
    """

    def run(cfg) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from lmtrain import distributed
        from lmtrain.sweep import write_result

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        rank = distributed.torchrun_rank()
        name = command if distributed.torchrun_world_size() == 1 else f"{command} (rank {rank})"
        sweeping = hydra_cfg.mode == RunMode.MULTIRUN
        overrides = list(hydra_cfg.overrides.task)
        started = time.time()
        try:
            typed = validate(cfg, schema, explicit=_keys(overrides))
            check_paths(typed)
            summary = importlib.import_module(f"lmtrain.commands.{command}").run(typed, str(run_dir))
        except Exception as err:
            if command in TRAINING_COMMANDS and rank == 0 and not isinstance(err, RunRefused):
                reason = _first_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {_first_line(err)}"
                try:
                    write_result(run_dir, "failed", {"error": reason, "wall_seconds": time.time() - started}, overrides)
                except UserError as unwritten:  # a full disk: say so, then report the failure itself
                    _fail(name, unwritten)
            if distributed.torchrun_world_size() > 1 and not os.environ.get("LMTRAIN_DEBUG"):
                # one line naming the rank, before torchrun stops the others; the traceback goes to the log file
                with open(run_dir / f"{command}.log", "a") as log_file:
                    log_file.write(f"rank {rank}: {traceback.format_exc()}")
                line = _first_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {_first_line(err)}"
                print(f"lmtrain {name}: error: {line} (traceback in {run_dir / f'{command}.log'})", file=sys.stderr)
                sys.exit(2 if isinstance(err, UserError) else 1)
            if os.environ.get("LMTRAIN_DEBUG") or not (sweeping or isinstance(err, UserError)):
                raise
            if sweeping:
                if not isinstance(err, UserError):
                    log.exception("job %s failed", hydra_cfg.job.num)
                _fail(f"{command} (job {hydra_cfg.job.num})", err)
                return float("nan")
            sys.exit(_fail(name, err))
        finally:
            distributed.shutdown()
        if summary is None:
            return None
        if rank == 0:
            try:
                write_result(run_dir, "completed", {**summary, "wall_seconds": time.time() - started}, overrides)
            except UserError as err:
                if sweeping:
                    _fail(f"{command} (job {hydra_cfg.job.num})", err)
                    return float("nan")
                sys.exit(_fail(name, err))
        return summary["objective"]

    return run


# torchrun, without its own report of a failed worker (a traceback of its own around the worker's error
# file): the failing rank has already printed its one line
TORCHRUN = """
import os, sys
level = os.environ.get("LOGLEVEL")
os.environ["LOGLEVEL"] = "CRITICAL"  # read once, when torch.distributed.elastic's loggers are made
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
os.environ.pop("LOGLEVEL") if level is None else os.environ.update(LOGLEVEL=level)
try:
    main(sys.argv[1:])
except ChildFailedError:
    sys.exit(1)
"""


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """trainer.nproc=N: run this same command under torchrun with N local processes."""
    import subprocess

    command = [
        sys.executable,
        "-c",
        TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lmtrain",
        *argv,
    ]
    return subprocess.run(command).returncode


def _torchrun_overrides(command: str, overrides: list[str], trainer) -> list[str]:
    """Under torchrun every process must use one run dir: the main process picks it and tells the others;
    only the main process writes Hydra's files and logs."""
    from lmtrain import distributed

    distributed.init_process_group(trainer.device, trainer.dist_timeout_s)
    extra = []
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        suffix = "" if command == "pretrain" else f"-{command}"
        extra.append(
            "hydra.run.dir=" + distributed.broadcast_object(time.strftime(f"outputs/%Y-%m-%d/%H-%M-%S{suffix}"))
        )
    if distributed.torchrun_rank() > 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


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
    if command not in COMMANDS:
        hint = nearest(command, [*COMMANDS, "report", "plan"])
        print(
            f"lmtrain: error: unknown command '{command}'" + (f" (did you mean '{hint}'?)" if hint else ""),
            file=sys.stderr,
        )
        print(USAGE, file=sys.stderr)
        return 2
    config_name, schema = COMMANDS[command]

    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(rest)
    if args.overrides:  # string values as typed, here and in the torchrun relaunch
        given = set(args.overrides)
        args.overrides = literal_strings(schema, args.overrides, args.multirun)
        quoted = iter(args.overrides)
        rest = [next(quoted) if item in given else item for item in rest]
        argv = [command, *rest]
    if not (args.help or args.hydra_help or args.info or args.shell_completion):
        try:
            if args.multirun:
                first = check(config_name, schema, _first_values(args.overrides), check_values=False)
                try:  # paths no job can use fail the sweep here; values are each job's own to check
                    check_paths(validate(first, schema))
                except ConfigError:
                    pass
            else:
                typed = check(config_name, schema, args.overrides)
                check_paths(typed)
                check_run_dir(args.overrides)
                nproc = getattr(getattr(typed, "trainer", None), "nproc", 1)
                if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not args.cfg:
                    return _launch_torchrun(nproc, argv)
        except UserError as err:
            if os.environ.get("LMTRAIN_DEBUG"):
                raise
            return _fail(command, err)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.multirun:
            if command not in TRAINING_COMMANDS:  # evaluate, generate, ...: the main process does the work
                return 0 if int(os.environ.get("RANK", "0")) > 0 else _run_hydra(command, config_name, schema, rest)
            rest = [*rest, *_torchrun_overrides(command, args.overrides, typed.trainer)]
    return _run_hydra(command, config_name, schema, rest)


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
