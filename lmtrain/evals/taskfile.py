"""lm-evaluation-harness task files (YAML): the common subset lmtrain runs, read into a `TaskSpec`.

The keys and their defaults are lm-evaluation-harness's (`lm_eval.config.task.TaskConfig`); a key lmtrain cannot
run (a `!function`, an unknown metric or filter, a key outside the subset) is a one-line UserError naming the
file and the key. A group file (`group:` with a `task:` list) names task files, task names found beside it,
or inline task configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmtrain.core.errors import UserError

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes"),
    "generate_until": ("exact_match",),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
# lm-evaluation-harness's DEFAULT_METRIC_REGISTRY: the metrics of a task without metric_list
DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
}
METRIC_OPTIONS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation", "regexes_to_ignore"}
FILTERS = {"regex": {"regex_pattern", "group_select", "fallback"}, "take_first": set(), "lowercase": set()}
FILTERS |= {"uppercase": set(), "remove_whitespace": set()}
IGNORED = {"tag", "task_alias", "metadata", "should_decontaminate", "doc_to_decontamination_query", "dataset_name"}
KNOWN = {
    "task", "include", "dataset_path", "dataset_kwargs", "training_split", "validation_split", "test_split",
    "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "description", "target_delimiter",
    "fewshot_delimiter", "fewshot_config", "num_fewshot", "output_type", "generation_kwargs", "filter_list",
    "metric_list", "repeats",
} | IGNORED  # fmt: skip
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval.defaults.DEFAULT_MAX_GEN_TOKS


@dataclass
class TaskSpec:
    """One task, as lm-evaluation-harness's TaskConfig reads it (same defaults)."""

    name: str
    file: Path
    dataset_path: str
    output_type: str = "generate_until"
    dataset_name: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    sampler: str = "default"  # fewshot_config.sampler: default (seeded random) or first_n
    num_fewshot: int | None = None
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    filters: list[tuple[str, list[tuple[str, dict]]]] = field(default_factory=list)  # (name, [(function, kwargs)])
    metrics: list[tuple[str, dict]] = field(default_factory=list)  # (metric, options)


class _FunctionTag:
    def __init__(self, value: str):
        self.value = value


class _Loader(yaml.SafeLoader):
    """YAML with lm-evaluation-harness's `!function module.name` tag kept as a marker, reported by key."""


_Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a task file is a mapping of keys (task, dataset_path, ...)")
    return data


def _merged(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's keys over those of its `include:` (resolved beside it), as lm-evaluation-harness merges them."""
    if path in seen:
        raise UserError(f"{path}: include: includes itself")
    data = read_yaml(path)
    base = data.pop("include", None)
    if base is None:
        return data
    if isinstance(base, _FunctionTag) or not isinstance(base, str):
        raise UserError(f"{path}: include: must name a YAML file")
    return {**_merged((path.parent / base).resolve(), (*seen, path)), **data}


def _find_tag(value: Any, key: str) -> str | None:
    if isinstance(value, _FunctionTag):
        return key
    if isinstance(value, dict):
        return next((found for k, v in value.items() if (found := _find_tag(v, f"{key}.{k}"))), None)
    if isinstance(value, list):
        return next((found for i, v in enumerate(value) if (found := _find_tag(v, f"{key}[{i}]"))), None)
    return None


def task_spec(data: dict, file: Path) -> TaskSpec:
    """A TaskSpec from a task file's keys; raises UserError naming `file` and the key lmtrain cannot run."""
    for key, value in data.items():
        if (tagged := _find_tag(value, key)) is not None:
            raise UserError(f"{file}: {tagged}: !function entries run Python; lmtrain runs templates and fields only")
        if key not in KNOWN:
            raise UserError(f"{file}: {key}: not supported by lmtrain (supported: {', '.join(sorted(KNOWN))})")
    for key in ("task", "dataset_path"):
        if not isinstance(data.get(key), str):
            raise UserError(f"{file}: {key}: missing (a string is needed)")
    output_type = data.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"{file}: output_type: '{output_type}' is not one of {', '.join(OUTPUT_TYPES)}")
    if data.get("repeats", 1) != 1:
        raise UserError(f"{file}: repeats: lmtrain decodes greedily once (repeats: 1)")
    spec = TaskSpec(name=data["task"], file=file, dataset_path=data["dataset_path"], output_type=output_type)
    for key in ("dataset_name", "training_split", "validation_split", "test_split", "fewshot_split", "description"):
        if data.get(key) is not None:
            setattr(spec, key, _string(data, key, file))
    for key in ("target_delimiter", "fewshot_delimiter"):
        if key in data:
            setattr(spec, key, _string(data, key, file))
    spec.dataset_kwargs = dict(data.get("dataset_kwargs") or {})
    spec.doc_to_text, spec.doc_to_target = data.get("doc_to_text"), data.get("doc_to_target")
    spec.doc_to_choice = data.get("doc_to_choice")
    spec.num_fewshot = data.get("num_fewshot")
    if spec.num_fewshot is not None and (not isinstance(spec.num_fewshot, int) or spec.num_fewshot < 0):
        raise UserError(f"{file}: num_fewshot: must be a whole number >= 0, got {spec.num_fewshot!r}")
    if spec.test_split is None and spec.validation_split is None:
        raise UserError(f"{file}: test_split: missing (a task scores its test_split, else its validation_split)")
    _fewshot_config(spec, data.get("fewshot_config") or {}, file)
    _generation(spec, data.get("generation_kwargs"), file)
    spec.metrics = _metrics(data.get("metric_list"), output_type, file)
    spec.filters = _filters(data.get("filter_list"), file)
    return spec


def _string(data: dict, key: str, file: Path) -> str:
    if not isinstance(data[key], str):
        raise UserError(f"{file}: {key}: must be a string, got {data[key]!r}")
    return data[key]


def _fewshot_config(spec: TaskSpec, config: dict, file: Path) -> None:
    for key, value in config.items():
        if key == "sampler" and value in ("default", "first_n"):
            spec.sampler = value
        elif key == "sampler":
            raise UserError(f"{file}: fewshot_config.sampler: '{value}' is not one of default, first_n")
        else:
            raise UserError(f"{file}: fewshot_config.{key}: not supported by lmtrain (only sampler)")


def _generation(spec: TaskSpec, kwargs: Any, file: Path) -> None:
    """lm-evaluation-harness's defaults: until the fewshot delimiter, 256 tokens, greedy."""
    kwargs = dict(kwargs or {})
    for key in kwargs:
        if key not in GENERATION_KEYS:
            raise UserError(f"{file}: generation_kwargs.{key}: not supported by lmtrain (greedy decoding only)")
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) != 0.0:
        raise UserError(f"{file}: generation_kwargs: lmtrain decodes greedily (do_sample: false, temperature: 0)")
    until = kwargs.get("until", [spec.fewshot_delimiter])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise UserError(f"{file}: generation_kwargs.until: must be a string or a list of strings")
    spec.until = list(until)
    spec.max_gen_toks = kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(spec.max_gen_toks, int) or spec.max_gen_toks < 1:
        raise UserError(f"{file}: generation_kwargs.max_gen_toks: must be a whole number >= 1")


def _metrics(metric_list: Any, output_type: str, file: Path) -> list[tuple[str, dict]]:
    if metric_list is None:
        return [(name, {}) for name in DEFAULT_METRICS[output_type]]
    metrics = []
    for i, entry in enumerate(metric_list if isinstance(metric_list, list) else [metric_list]):
        if not isinstance(entry, dict) or "metric" not in entry:
            raise UserError(f"{file}: metric_list[{i}]: needs a 'metric' key")
        name = entry["metric"]
        if name not in METRICS[output_type]:
            raise UserError(
                f"{file}: metric_list[{i}].metric: '{name}' is not one lmtrain computes for {output_type} "
                f"({', '.join(METRICS[output_type])})"
            )
        unknown = set(entry) - METRIC_OPTIONS
        if unknown:
            raise UserError(f"{file}: metric_list[{i}].{sorted(unknown)[0]}: not supported by lmtrain")
        aggregation = entry.get("aggregation", "mean" if output_type != "loglikelihood_rolling" else None)
        if output_type != "loglikelihood_rolling" and aggregation != "mean":
            raise UserError(f"{file}: metric_list[{i}].aggregation: lmtrain aggregates {name} by mean")
        options = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}
        metrics.append((name, options))
    return metrics


def _filters(filter_list: Any, file: Path) -> list[tuple[str, list[tuple[str, dict]]]]:
    if filter_list is None:
        return [("none", [("take_first", {})])]
    filters = []
    for i, entry in enumerate(filter_list):
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("filter"), list):
            raise UserError(f"{file}: filter_list[{i}]: needs 'name' and a 'filter' list")
        steps = []
        for j, step in enumerate(entry["filter"]):
            function = step.get("function") if isinstance(step, dict) else None
            if function not in FILTERS:
                raise UserError(
                    f"{file}: filter_list[{i}].filter[{j}].function: '{function}' is not one of "
                    + ", ".join(sorted(FILTERS))
                )
            options = {k: v for k, v in step.items() if k != "function"}
            if set(options) - FILTERS[function]:
                raise UserError(f"{file}: filter_list[{i}].filter[{j}].{sorted(set(options))[0]}: not supported")
            steps.append((function, options))
        filters.append((str(entry["name"]), steps))
    return filters
