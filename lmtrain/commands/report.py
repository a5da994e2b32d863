"""`lmtrain report PATH...`: compare runs (a sweep dir, single runs, or several) in one table and plots.

Reads each run dir's `result.json`, `metrics.jsonl` and `.hydra/overrides.yaml`; never imports torch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from pathlib import Path

from lmtrain.analysis.runs import Run, load_run
from lmtrain.core.errors import UserError
from lmtrain.train.sweep import RESULT_FILE

log = logging.getLogger("lmtrain")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _is_run(path: Path) -> bool:
    return (path / RESULT_FILE).is_file() or (path / "metrics.jsonl").is_file()


def find_runs(paths: list[str]) -> list[Run]:
    runs = []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise UserError(f"report: no such run or sweep dir '{raw}'")
        dirs = (
            [root]
            if _is_run(root)
            else sorted(
                {p.parent for pattern in (RESULT_FILE, "metrics.jsonl") for p in root.rglob(pattern)},
                key=_natural_key,
            )
        )
        if not dirs:
            raise UserError(f"report: '{raw}' holds no runs (no {RESULT_FILE} or metrics.jsonl below it)")
        for path in dirs:
            name = path.name if path == root else str(path.relative_to(root))
            runs.append(load_run(path, name))
    return runs


def differing_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (all keys for a single run)."""
    keys = sorted({k for run in runs for k in run.overrides})
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def sort_runs(runs: list[Run]) -> list[Run]:
    """Completed runs by objective (lower is better), then incomplete, then failed."""
    rank = {"completed": 0, "incomplete": 1, "failed": 2}

    def key(run: Run):
        objective = run.objective
        missing = objective is None or (isinstance(objective, float) and math.isnan(objective))
        return rank.get(run.status, 1), missing, objective if not missing else 0.0

    return sorted(runs, key=key)


def rows(runs: list[Run]) -> tuple[list[str], list[list]]:
    keys = differing_keys(runs)
    metric = next((r.result.get("metric") for r in runs if r.result.get("metric")), "val_loss")
    header = ["run", *keys, f"best {metric}", f"final {metric}", "steps", "tokens/s", "wall s", "status"]
    table = []
    for run in runs:
        r = run.result
        table.append(
            [
                run.name,
                *[run.overrides.get(k, "-") for k in keys],
                r.get(f"best_{metric}"),
                r.get(f"final_{metric}"),
                r.get("steps"),
                r.get("tokens_per_s"),
                r.get("wall_seconds"),
                run.status if run.status != "failed" else f"failed: {r.get('error', '')}",
            ]
        )
    return header, table


def suite_rows(runs: list[Run]) -> tuple[list[str], list[list]] | None:
    """The benchmark suite's scores of each run (trainer.eval_suite), side by side: the last value each run
    recorded of every val_suite_* metric; None when no run scored a suite."""
    last: list[dict] = []
    for run in runs:
        scores: dict = {}
        for record in run.metrics:
            scores |= {k: v for k, v in record.items() if k.startswith("val_suite_")}
        last.append(scores)
    names = sorted({k for scores in last for k in scores}, key=lambda k: (k not in SUITE_FIRST, k))
    if not names:
        return None
    header = ["run", *[n.removeprefix("val_suite_") for n in names]]
    return header, [[run.name, *[s.get(n) for n in names]] for run, s in zip(runs, last, strict=True)]


SUITE_FIRST = ("val_suite_core", "val_suite_mean")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and re.fullmatch(r"-?\d+\.\d{5,}(e-?\d+)?", value):
        value = float(value)  # an Optuna-sampled override: 0.0005830812197294668 -> 0.0005831
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def render(header: list[str], table: list[list], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(header, row, strict=True)) for row in table], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
        return out.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in table]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmtrain report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep dirs or run dirs")
    parser.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown")
    parser.add_argument("--out", help="folder for the PNG plots (default: the first PATH)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    try:
        runs = sort_runs(find_runs(args.paths))
    except UserError as err:
        print(f"lmtrain report: error: {str(err).removeprefix('report: ')}", file=sys.stderr)
        return 2
    header, table = rows(runs)
    if (suite := suite_rows(runs)) is not None:  # benchmark scores as more columns of the same runs
        header, table = header + suite[0][1:], [row + extra[1:] for row, extra in zip(table, suite[1], strict=True)]
    print(render(header, table, args.format))
    if args.no_plots:
        return 0
    try:
        from lmtrain.analysis import plots
    except ImportError:
        print(
            "lmtrain report: plots skipped: matplotlib is not installed (pip install 'lmtrain[plots]')",
            file=sys.stderr,
        )
        return 0
    out = Path(args.out or args.paths[0]).expanduser()
    for path in plots.write_plots(runs, differing_keys(runs), out):
        print(f"wrote {path}", file=sys.stderr)
    return 0
