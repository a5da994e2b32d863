"""PNG plots for `lmtrain report` (matplotlib, an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from lmtrain.analysis.runs import Run


def _tokens_per_step(run: Run) -> float:
    train = [r for r in run.metrics if "tokens_seen" in r and r["step"] > 0]
    return train[-1]["tokens_seen"] / train[-1]["step"] if train else 0.0


def _label(run: Run, keys: list[str]) -> str:
    """The run's name and the values of the swept keys."""
    swept = ", ".join(f"{k}={run.overrides.get(k, '-')}" for k in keys)
    return f"{run.name} ({swept})" if swept else run.name


def loss_figure(runs: list[Run], keys: list[str], x: str) -> plt.Figure:
    """Training loss (solid) and validation loss (dashed, dots) of every run against step or tokens."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        scale = _tokens_per_step(run) if x == "tokens" else 1.0
        color = f"C{i % 10}"
        train = [(r["step"] * scale, r["loss"]) for r in run.metrics if "loss" in r]
        val = [(r["step"] * scale, r["val_loss"]) for r in run.metrics if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, linewidth=1.2, label=f"{_label(run, keys)} train")
        if val:
            ax.plot(
                *zip(*val, strict=True),
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{_label(run, keys)} val",
            )
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss against {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=1 if len(runs) > 4 else 2)
    fig.tight_layout()
    return fig


def lr_figure(runs: list[Run], keys: list[str]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, run in enumerate(runs):
        points = [(r["step"], r["lr"]) for r in run.metrics if "lr" in r]
        if points:
            ax.plot(*zip(*points, strict=True), color=f"C{i % 10}", label=_label(run, keys))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def parameter_figure(runs: list[Run], key: str) -> plt.Figure:
    """The sweep's metric against its one swept parameter (log x-axis for positive numbers spanning 10×)."""
    done = [r for r in runs if r.status == "completed" and r.objective is not None and key in r.overrides]
    metric = next((r.result.get("metric") for r in done), "val_loss")
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        points = sorted((float(r.overrides[key]), r.result.get(f"best_{metric}")) for r in done)
        ax.plot(*zip(*points, strict=True), marker="o")
        xs = [p[0] for p in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    except ValueError:  # categorical values
        labels = [r.overrides[key] for r in done]
        best = [r.result.get(f"best_{metric}") for r in done]  # None (metric missing) plots as a gap
        ax.plot(range(len(done)), best, marker="o", linestyle="none")  # type: ignore[arg-type]
        ax.set_xticks(range(len(done)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} against {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


SUITE_PREFIX = "val_suite_"  # benchmark scores recorded at validations (trainer.eval_suite)


def suite_figure(runs: list[Run], keys: list[str]) -> plt.Figure | None:
    """Each run's suite scores (val_suite_core solid; the tasks' main scores dotted) against step; None when no
    run scored a suite."""
    names = sorted({k for run in runs for r in run.metrics for k in r if k.startswith(SUITE_PREFIX)})
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        for name in names:
            points = [(r["step"], r[name]) for r in run.metrics if name in r]
            if points:
                style = "-" if name == "val_suite_core" else ":"
                label = f"{_label(run, keys)} {name.removeprefix(SUITE_PREFIX)}"
                ax.plot(*zip(*points, strict=True), color=f"C{i % 10}", linestyle=style, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title("benchmark suite against step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig


def figures(runs: list[Run], swept_keys: list[str]) -> dict[str, plt.Figure]:
    figs = {
        "report_loss_vs_step.png": loss_figure(runs, swept_keys, "step"),
        "report_loss_vs_tokens.png": loss_figure(runs, swept_keys, "tokens"),
        "report_lr.png": lr_figure(runs, swept_keys),
    }
    if len(swept_keys) == 1 and len(runs) > 1:
        safe = swept_keys[0].replace("/", "_")
        figs[f"report_metric_vs_{safe}.png"] = parameter_figure(runs, swept_keys[0])
    if (suite := suite_figure(runs, swept_keys)) is not None:
        figs["report_suite.png"] = suite
    return figs


def write_plots(runs: list[Run], swept_keys: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(runs, swept_keys).items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written
