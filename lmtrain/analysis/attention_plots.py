"""PNG figures for `lmtrain inspect` (matplotlib, the optional `plots` extra): attention maps, the logit lens."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _fontsize(n: int) -> float:
    return max(6.0, min(10.0, 400 / max(n, 1)))


def attention_png(probs, labels: list[str], title: str, path: Path) -> Path:
    """probs [T, T] (query rows, key columns) as a heatmap with the tokens on both axes."""
    n = len(labels)
    size = min(16.0, max(4.0, 0.28 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=_fontsize(n), family="monospace")
    ax.set_yticks(range(n), labels, fontsize=_fontsize(n), family="monospace")
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("attending token (query)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def logit_lens_png(probs, top: list[list[str]], labels: list[str], path: Path) -> Path:
    """probs [layers, T]: the probability of each layer's top prediction, annotated with that token; columns are
    the input tokens, rows the layers (bottom: first)."""
    layers, n = len(top), len(labels)
    fig, ax = plt.subplots(figsize=(min(30.0, max(6.0, 0.55 * n + 2)), max(3.0, 0.45 * layers + 1.5)))
    ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer in range(layers):
        for i in range(n):
            color = "white" if probs[layer][i] > 0.6 else "black"
            ax.text(i, layer, top[layer][i], ha="center", va="center", fontsize=_fontsize(n), color=color)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=_fontsize(n), family="monospace")
    ax.set_yticks(range(layers), [f"layer {i}" for i in range(layers)])
    ax.set_xlabel("input token (the cell: the top next-token prediction read from that layer)")
    ax.set_title("logit lens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
