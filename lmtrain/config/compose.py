"""Composing a command's config as Hydra will, and checking it before anything runs: group options, unknown
keys (with the nearest valid name), option names, quoting of text values, then the typed values
(`lmtrain.config.checks.validate`). Every problem is a ConfigError naming the key to fix."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, open_dict, read_write

from lmtrain.config.checks import ConfigError, validate
from lmtrain.config.keys import CHOICES, all_keys, nearest, string_keys
from lmtrain.config.paths import check_out_folder
from lmtrain.config.store import IDENTITY

CONFIG_PACKAGE = "lmtrain.configs"


def group_options(group: str) -> list[str] | None:
    """The options of config group `group`: its YAML files under configs/, and those stored in Hydra's
    ConfigStore (a task registered by lmtrain.tasks.registry.register); None when no such group."""
    from hydra.core.config_store import ConfigStore

    folder = importlib.resources.files(CONFIG_PACKAGE) / group
    stored = ConfigStore.instance().repo.get(group)
    if not folder.is_dir() and not isinstance(stored, dict):
        return None
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    names += list(stored) if isinstance(stored, dict) else []
    return sorted({name[: -len(".yaml")] for name in names if name.endswith(".yaml")})


def no_such_option(key: str, value: str, options: list[str]) -> ConfigError:
    hint = nearest(value, options)
    return ConfigError(
        f"{key}={value}: no such option; choose from {', '.join(options)}"
        + (f" (did you mean '{hint}'?)" if hint else "")
    )


def first_values(overrides: list[str]) -> list[str]:
    """Replace each sweep (`a=1,2`, `glob(*)`, `range(1,4)`, `interval(0,1)`, `tag(...)`) by its first value so
    one job of a multirun can be checked; every option a group sweep names must exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(first_line(err)) from None
    checked: list[str] = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        options = group_options(key) if "." not in key else None
        value = override.value()
        if key == "trainer.nproc" and override.is_sweep_override():
            raise ConfigError("trainer.nproc: a -m sweep runs its jobs in this process; start them with torchrun")
        if not override.is_sweep_override():
            checked.append(str(override.input_line))
            continue
        if isinstance(value, Glob):
            if options is None:
                raise ConfigError(f"{key}: glob(...) sweeps the options of a config group; list values instead")
            values = value.filter(options)
            if not values:
                raise ConfigError(
                    f"{key}: {str(override.input_line).split('=', 1)[1]} matches none of {', '.join(options)}"
                )
        elif override.is_discrete_sweep() or not isinstance(value, IntervalSweep):
            values = list(override.sweep_string_iterator())
        else:  # interval(a, b): its lower end stands for the job
            if not any(o.lstrip("+").startswith(("hydra/sweeper=", "search=")) for o in overrides):
                raise ConfigError(
                    f"{key}: interval(...) is searched by a sweeper such as Optuna: add +search=optuna "
                    "(make setup-optuna), or list values: a,b,c"
                )
            values = [str(value.start)]
        for option in values if options is not None else []:
            if options is not None and option not in options:
                raise no_such_option(key, option, options)
        checked.append(f"{override.get_key_element()}={values[0]}")
    return checked


def check(config_name: str, schema: type, overrides: list[str], check_values: bool = True) -> Any:
    """Compose and validate the config as Hydra will; raises ConfigError naming the key to fix.

    check_values=False checks keys and group options only (for a sweep, whose jobs check their own values).
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    groups: list[str] = []
    values: list[str] = []
    for override in overrides:
        key = override.split("=", 1)[0]
        bare = key.lstrip("+~")
        if bare.startswith("hydra.") or bare.startswith("hydra/"):
            continue
        (groups if "." not in bare and group_options(bare) is not None else values).append(override)
    check_identity(values)
    for override in groups:
        key, _, value = override.partition("=")
        options = group_options(key.lstrip("+~")) or []
        if value and value not in options:
            raise no_such_option(key.lstrip("+~"), value, options)
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        if groups:  # the command's own groups, composed only when the command line picks an option
            _check_groups_are_the_commands(compose(config_name, return_hydra_config=True), schema, groups)
        try:  # composed once when all is well; the groups alone only to explain a failure
            cfg = compose(config_name, overrides=groups + values, return_hydra_config=True)
        except HydraException as err:
            try:
                base = compose(config_name, overrides=groups)
            except HydraException as group_err:
                raise ConfigError(plugin_hint(first_line(group_err))) from None
            _check_keys(base, values)
            raise ConfigError(first_line(err)) from None
    name_options(cfg, cfg.hydra.runtime.choices)
    check_mixture(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(cfg, schema, explicit=explicit_keys(values)) if check_values else cfg


def _check_groups_are_the_commands(plain, schema: type, groups: list[str]) -> None:
    """A folder of options serves the commands whose defaults list names it: `finetune data=python_stdlib`
    (pretrain's corpus options) would otherwise merge into finetune's records config."""
    own = set(plain.hydra.runtime.choices)
    fields = {key for key in all_keys(schema) if "." not in key}
    for override in groups:
        key, _, value = override.partition("=")
        group = key.lstrip("+~")
        if group in fields and group not in own:
            name = plain.hydra.job.name
            raise ConfigError(f"{group}={value}: {name} takes no {group}=... option; set its {group}.* keys instead")


def check_identity(overrides: list[str]) -> None:
    """`optimizer.name=sgd` would train SGD with another option's settings: the option is chosen by name."""
    for override in overrides:
        key, _, value = override.partition("=")
        group, _, leaf = key.lstrip("+~").partition(".")
        if IDENTITY.get(group) == leaf:
            raise ConfigError(f"{group}.{leaf}: the option chosen sets it; choose {group}={value} instead")


def name_options(cfg: DictConfig, choices: Mapping[str, str | None]) -> None:
    """Write each group's chosen option (Hydra's `runtime.choices`) into the group's name key, in place."""
    with read_write(cfg), open_dict(cfg):
        for group, key in IDENTITY.items():
            if choices.get(group) and group in cfg:
                cfg[group][key] = choices[group]


def _check_keys(base, values: list[str]) -> None:
    """Raise ConfigError naming the first override whose key `base` (the composed groups) lacks, with the
    nearest known key."""
    from omegaconf import OmegaConf

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


def check_mixture(cfg) -> None:
    """data=mixture with no source would train on data.train instead, which nobody asked for."""
    if cfg.hydra.runtime.choices.get("data") == "mixture" and not cfg.data.get("sources"):
        raise ConfigError(
            "data.sources: data=mixture needs at least one source, e.g. "
            "data.sources='[{path: web/, weight: 1.0}]' (or drop data=mixture to train on data.train)"
        )


def explicit_keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def section_paths(schema: type, words: list[str]) -> list[str]:
    """`suite=<file>` means `suite.path=<file>`: a section with a `path` key is set by its name (the section's
    other keys stay settable: `suite.limit=500`)."""
    keys = set(all_keys(schema))
    out = []
    for word in words:
        key, eq, value = word.partition("=")
        bare = key.lstrip("+")
        shorthand = eq and not word.startswith("-") and bare in keys and f"{bare}.path" in keys
        out.append(f"{key}.path={value}" if shorthand else word)
    return out


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


def plugin_hint(message: str) -> str:
    for config, extra in PLUGINS.items():
        if f"'{config}'" in message:
            return f"{config} is not installed: pip install 'lmtrain[{extra}]' (or make setup-{extra})"
    return message


def first_line(err: BaseException) -> str:
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
