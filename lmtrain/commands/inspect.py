"""`lmtrain inspect ckpt=... text="..."`: per-token loss (terminal and HTML), attention maps and the logit lens
(PNG, with the plots extra) of one text; for a classifier, each token's contribution to the predicted class.
Writes everything in the run dir, listed in `inspect.json`."""

from __future__ import annotations

import html
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from lmtrain.analysis import interpret
from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.config import InspectConfig
from lmtrain.core.distributed import resolve_device
from lmtrain.core.errors import UserError
from lmtrain.tasks.base import Task, load_task_info
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.registry import task_for

log = logging.getLogger("lmtrain")
LM_VIEWS = ["loss", "attention", "logit_lens"]
CLASSIFIER_VIEWS = ["contribution", "attention"]


def _label(tokenizer, token_id: int) -> str:
    """A token as readable text: its decoded string with whitespace made visible."""
    text = tokenizer.decode([token_id])  # empty for a special token: shown by its name
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or tokenizer.id_to_token(token_id)


def _shade(value: float, top: float) -> float:
    """value's share of top, clamped to 0..1: how strongly a token is shaded."""
    return 0.0 if top <= 0 else max(0.0, min(1.0, value / top))


def _terminal(labels: list[str], values: list[float | None], signed: bool = False) -> str:
    """Tokens with a background from white (0) to red (the largest |value|); blue for negatives when signed."""
    top = max((abs(v) for v in values if v is not None), default=0.0)
    if not sys.stdout.isatty():
        return " ".join(f"{t}[{v:.2f}]" if v is not None else t for t, v in zip(labels, values, strict=True))
    out = []
    for text, value in zip(labels, values, strict=True):
        level = _shade(abs(value), top) if value is not None else 0.0
        fade = int(255 * (1 - 0.8 * level))
        rgb = (fade, fade, 255) if signed and value is not None and value < 0 else (255, fade, fade)
        out.append(f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[30m{text}\x1b[0m")
    return "".join(out)


def _html(labels: list[str], values: list[float | None], title: str, legend: str, signed: bool = False) -> str:
    """A page of the tokens shaded as in the terminal, each value in its tooltip."""
    top = max((abs(v) for v in values if v is not None), default=0.0)
    spans = []
    for text, value in zip(labels, values, strict=True):
        level = _shade(abs(value), top) if value is not None else 0.0
        color = (
            f"rgba(40,90,255,{level:.3f})"
            if signed and value is not None and value < 0
            else (f"rgba(255,40,40,{level:.3f})")
        )
        tip = f"{value:.4f}" if value is not None else "no prediction (first token)"
        spans.append(f'<span style="background:{color}" title="{tip}">{html.escape(text)}</span>')
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<body style='font-family:monospace;line-height:1.9;max-width:60em'>"
        f"<h3>{html.escape(title)}</h3><p>{html.escape(legend)}</p><p>{''.join(spans)}</p></body>\n"
    )


def _indices(requested: list[int] | None, count: int, key: str, what: str) -> list[int]:
    """The requested layers or heads, checked against the model's count, sorted; all of them if none."""
    if requested is None:
        return list(range(count))
    for i in requested:
        if i >= count:
            raise UserError(f"{key}: {i} is not a {what} of this model (it has {count}: 0..{count - 1})")
    return sorted(set(requested))


def _plots():
    """lmtrain.analysis.attention_plots, or None (with a warning) without matplotlib."""
    try:
        from lmtrain.analysis import attention_plots as inspect_plots
    except ImportError:
        log.warning("PNGs skipped: matplotlib is not installed (pip install 'lmtrain[plots]')")
        return None
    return inspect_plots


def _read_text(cfg: InspectConfig) -> str:
    """The text to inspect: `text`, or the contents of `text_file`."""
    text = cfg.text
    if cfg.text_file:
        path = Path(cfg.text_file).expanduser()
        if not path.is_file():
            raise UserError(f"text_file: no such file '{cfg.text_file}'")
        text = path.read_text()
    if not text:
        raise UserError("text: empty; give the text to inspect")
    return text


def _views(requested: list[str] | None, classifier: bool) -> list[str]:
    """The views to draw: those requested (each must suit the checkpoint's kind), or all that suit it."""
    allowed = CLASSIFIER_VIEWS if classifier else LM_VIEWS
    views = requested or allowed
    for view in views:
        if view not in allowed:
            kind = "a classification" if classifier else "a language-model"
            raise UserError(f"views: {view} does not apply to {kind} checkpoint; choose from {', '.join(allowed)}")
    return views


def _token_ids(text: str, task: Task, max_seq_len: int) -> tuple[list[int], list[int]]:
    """The text's token ids and the model's inputs among them: for a classifier all of them, as predict reads
    the text (cut to fit, then EOT where the head reads); for a language model all but the last, as evaluate
    scores a text (the model's BOS where its tokenizer puts one, text, its own EOT, each token predicted from
    the ones before it)."""
    if task.classifies:
        ids = task.encode_texts([text])[0][0].ids
        return ids, ids
    ids = task.start + task.tokenizer.encode(text, add_special_tokens=False).ids + [task.eot]
    if len(ids) > max_seq_len + 1:
        log.warning("text: %d tokens; inspecting the first %d (the model's context + 1)", len(ids), max_seq_len + 1)
        ids = ids[: max_seq_len + 1]
    if len(ids) < 2:
        raise UserError("text: empty; give the text to inspect")
    return ids, ids[:-1]


def _loss_view(result: interpret.Trace, tokens: torch.Tensor, labels: list[str], out: Path) -> dict:
    """Per-token loss: token_loss.html, printed shaded in the terminal; returns its inspect.json entry."""
    losses = interpret.token_losses(result.logits, tokens).tolist()
    values = [None, *losses]
    (out / "token_loss.html").write_text(
        _html(labels, values, "per-token loss", "redder: more surprising (loss in nats; hover for the value)")
    )
    total = sum(losses)
    print(f"per-token loss (nats; mean {total / len(losses):.4f} over {len(losses)} predicted tokens):")
    print(_terminal(labels, values))
    return {"per_token": losses, "total": total, "mean": total / len(losses), "html": "token_loss.html"}


def _contribution_view(model, tokens: torch.Tensor, labels: list[str], class_names: list, out: Path) -> dict:
    """Each token's contribution to the predicted class: contribution.html, printed shaded in the terminal;
    returns its inspect.json entry."""
    predicted, probs, scores = interpret.contributions(model, tokens)
    label = class_names[predicted]
    (out / "contribution.html").write_text(
        _html(
            labels,
            scores.tolist(),
            f"contributions to the predicted class {label!r} (p={probs[predicted]:.3f})",
            "gradient × input on the token embeddings: red pushes toward the class, blue away",
            signed=True,
        )
    )
    print(f"predicted {label!r} (p={probs[predicted]:.3f}); contribution of each token:")
    print(_terminal(labels, scores.tolist(), signed=True))
    return {
        "label": label,
        "probabilities": {str(k): p for k, p in zip(class_names, probs.tolist(), strict=True)},
        "per_token": scores.tolist(),
        "method": "gradient x input",
        "html": "contribution.html",
    }


def _attention_view(result: interpret.Trace, layers: list[int], heads: list[int], labels: list[str], plots, out: Path):
    """Attention maps: one PNG per layer and head (with the plots extra); returns its inspect.json entry."""
    files = []
    if plots is not None:
        for layer in layers:
            for head in heads:
                name = f"attention_layer{layer}_head{head}.png"
                grid = result.attention[layer][head].cpu().numpy()
                plots.attention_png(grid, labels, f"attention, layer {layer}, head {head}", out / name)
                files.append(name)
    return {"layers": layers, "heads": heads, "png": files}


def _logit_lens_view(model, result: interpret.Trace, tokenizer, labels: list[str], plots, out: Path) -> dict:
    """The logit lens: printed as a table of each layer's top prediction, logit_lens.png with the plots extra;
    returns its inspect.json entry."""
    top, probs = interpret.logit_lens(model, result.residuals)
    table = [[_label(tokenizer, i) for i in row] for row in top.tolist()]
    entry: dict[str, Any] = {"top": table, "probability": probs.tolist()}
    if plots is not None:
        plots.logit_lens_png(probs.cpu().numpy(), table, labels, out / "logit_lens.png")
        entry["png"] = "logit_lens.png"
    width = max(len(t) for t in labels + [w for row in table for w in row])
    print("logit lens (top next-token prediction from each layer's residual stream):")
    print("input    " + " ".join(f"{t:>{width}}" for t in labels))
    for layer, row in enumerate(table):
        print(f"layer {layer:<2} " + " ".join(f"{t:>{width}}" for t in row))
    return entry


def _written(index: dict) -> list[str]:
    """The files the views wrote beside inspect.json (HTML pages and PNGs)."""
    written = [v[k] for v in index["views"].values() for k in ("html", "png") if isinstance(v.get(k), str)]
    return written + [f for v in index["views"].values() if isinstance(v.get("png"), list) for f in v["png"]]


@torch.no_grad()
def run(cfg: InspectConfig, run_dir: str) -> None:
    """Inspect one text with the checkpoint: print each view and write its files and inspect.json in run_dir."""
    device = resolve_device(cfg.device, "device")
    assert cfg.ckpt is not None, "ckpt is checked before the run"
    model, tokenizer = load_model(cfg.ckpt, device)
    info = load_task_info(cfg.ckpt)
    text = _read_text(cfg)
    # the model's own special tokens (BOS, end of text), whatever its tokenizer names them
    task = task_for(
        info or LanguageModelling.plain_info(),
        tokenizer,
        model.config.max_seq_len,
        load_special_tokens(cfg.ckpt, tokenizer),
    )
    views = _views(cfg.views, classifier=task.classifies)
    c = model.config
    layers = _indices(cfg.layers, c.num_layers, "layers", "layer")
    heads = _indices(cfg.heads, c.num_heads, "heads", "head")
    ids, inputs = _token_ids(text, task, c.max_seq_len)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = torch.tensor(ids, device=device)
    labels = [_label(tokenizer, i) for i in ids]
    input_labels = labels[: len(inputs)]
    index: dict = {"checkpoint": str(cfg.ckpt), "text": text, "tokens": labels, "views": {}}
    plots = _plots() if ("attention" in views or "logit_lens" in views) else None
    result = interpret.trace(model, tokens[: len(inputs)], layers if "attention" in views else [])
    if "loss" in views:
        index["views"]["loss"] = _loss_view(result, tokens, labels, out)
    if "contribution" in views:
        assert info is not None and info.labels is not None, "contribution is a classification view"
        index["views"]["contribution"] = _contribution_view(model, tokens, labels, info.labels, out)
    if "attention" in views:
        index["views"]["attention"] = _attention_view(result, layers, heads, input_labels, plots, out)
    if "logit_lens" in views:
        index["views"]["logit_lens"] = _logit_lens_view(model, result, tokenizer, input_labels, plots, out)
    (out / "inspect.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out / 'inspect.json'} and {len(_written(index))} files beside it")
