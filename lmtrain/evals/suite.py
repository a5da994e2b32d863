"""A suite: one lm-evaluation-harness task file, or a group file listing tasks; scored on a model into per-task
metrics, the suite's mean and its CORE-style centred accuracy (nanochat: (acc - chance) / (1 - chance))."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmtrain.core.errors import UserError
from lmtrain.evals.documents import Documents, load_splits
from lmtrain.evals.runner import TaskResult, run_task
from lmtrain.evals.scorer import Scorer
from lmtrain.evals.taskfile import TaskSpec, _merged, task_spec

ACCURACIES = ("acc", "acc_norm", "acc_bytes", "exact_match")  # the first of these a task reports is its main one


def load_suite(path: str | Path, key: str = "suite") -> tuple[str, list[TaskSpec]]:
    """(suite name, its tasks) from a task file or a group file (`group:` and a `task:` list of task files,
    task names defined by a YAML beside it, or inline task configs). Raises UserError naming the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: no such task or group file '{path}'")
    data = _merged(file.resolve())
    if "group" not in data:
        return str(data.get("task", file.stem)), [task_spec(data, file)]
    entries = data.get("task")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{file}: task: a group file lists its tasks (a non-empty list)")
    specs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            specs.append(task_spec({k: v for k, v in entry.items() if k != "include"} | _included(entry, file), file))
        elif isinstance(entry, str):
            specs.append(_named_task(entry, file, i))
        else:
            raise UserError(f"{file}: task[{i}]: a task name, a task file or a task config")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"{file}: task: '{next(n for n in names if names.count(n) > 1)}' is listed twice")
    return str(data["group"]), specs


def _included(entry: dict, file: Path) -> dict:
    if "include" not in entry:
        return {}
    base = {k: v for k, v in _merged((file.parent / str(entry["include"])).resolve()).items()}
    return {k: v for k, v in base.items() if k not in entry}


def _named_task(entry: str, group: Path, index: int) -> TaskSpec:
    """A task file (a path ending .yaml/.yml, beside the group file) or a task name defined beside it."""
    if entry.endswith((".yaml", ".yml")):
        path = (group.parent / entry).resolve()
        if not path.is_file():
            raise UserError(f"{group}: task[{index}]: no such task file '{path}'")
        return task_spec(_merged(path), path)
    for candidate in sorted(group.parent.rglob("*.y*ml")):
        if candidate.resolve() == group.resolve():
            continue
        try:
            data = _merged(candidate.resolve())
        except UserError:
            continue
        if data.get("task") == entry and "group" not in data:
            return task_spec(data, candidate.resolve())
    raise UserError(f"{group}: task[{index}]: no task named '{entry}' in a YAML file under {group.parent}")


def fewshot_count(spec: TaskSpec, override: int | None) -> int:
    """lm-evaluation-harness's rule: a task file's num_fewshot of 0 stays 0; else the override, the file's, 0."""
    if spec.num_fewshot == 0:
        return 0
    return override if override is not None else spec.num_fewshot or 0


def score_suite(
    specs: list[TaskSpec], scorer: Scorer, limit: int | None = None, num_fewshot: int | None = None, bar: Any = None
) -> dict[str, TaskResult]:
    """Every task's result, by task name. `bar` (a tqdm) is advanced by each request scored."""
    loaded = [(spec, Documents(spec, load_splits(spec))) for spec in specs]
    if bar is not None:
        bar.total = sum(len(d.docs[:limit] if limit is not None else d.docs) for _, d in loaded)
    results = {}
    for spec, docs in loaded:
        if bar is not None:
            bar.set_description(spec.name)
        results[spec.name] = run_task(
            spec, docs, scorer, fewshot_count(spec, num_fewshot), limit, _per_document(bar, spec, docs, limit)
        )
    return results


def _per_document(bar: Any, spec: TaskSpec, docs: Documents, limit: int | None):
    """A progress callback counting requests, shown as documents (a multiple-choice document has several)."""
    if bar is None:
        return lambda n: None
    if spec.output_type != "multiple_choice":
        return bar.update
    count = len(docs.docs[:limit] if limit is not None else docs.docs)
    per_doc = max(1, len(docs.choices(docs.docs[0], 0)))
    state = {"requests": 0, "shown": 0}

    def update(n: int) -> None:
        state["requests"] += n
        shown = min(count, state["requests"] // per_doc)
        bar.update(shown - state["shown"])
        state["shown"] = shown

    return update


def main_metric(result: TaskResult) -> str | None:
    return next((m for m in ACCURACIES if m in result.metrics), None)


def summary(results: dict[str, TaskResult]) -> dict[str, float]:
    """The suite's aggregate: the mean of each task's main accuracy and the mean centred accuracy (CORE)."""
    main = {name: r.metrics[m] for name, r in results.items() if (m := main_metric(r)) is not None}
    if not main:
        return {}
    centred = [(main[n] - results[n].chance) / (1 - results[n].chance) for n in main]
    return {"mean": sum(main.values()) / len(main), "core": sum(centred) / len(centred)}


def report(results: dict[str, TaskResult]) -> dict[str, dict]:
    """eval.json's content: {task: {metric: value, ..., "n": examples}, ..., "suite": {mean, core}}."""
    out: dict[str, dict] = {name: {**r.metrics, "n": r.n} for name, r in results.items()}
    if aggregate := summary(results):
        out["suite"] = aggregate
    return out


def write_samples(results: dict[str, TaskResult], path: Path) -> None:
    with open(path, "w") as f:
        for name, result in results.items():
            for sample in result.samples:
                f.write(json.dumps({"task": name, **sample}) + "\n")


def table(scores: dict[str, dict]) -> str:
    """A plain-text table: one row per task and metric."""
    rows = [("task", "metric", "value", "n")]
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if metric != "n":
                shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
                rows.append((task, metric, shown, str(metrics.get("n", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def flat_metrics(scores: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """metrics.jsonl's keys: eval/<task>/<metric> and eval/suite/<mean|core>."""
    return {f"{prefix}/{task}/{m}": float(v) for task, ms in scores.items() for m, v in ms.items() if m != "n"}
