"""Score one task: build its requests, run them through a Scorer, and compute lm-evaluation-harness's metrics
(`ConfigurableTask.process_results`, the `mean` / `weighted_perplexity` / `bits_per_byte` aggregations)."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmtrain.core.errors import UserError
from lmtrain.evals.documents import Documents
from lmtrain.evals.scorer import Scorer
from lmtrain.evals.taskfile import TaskSpec

Progress = Callable[[int], None]


@dataclass
class TaskResult:
    """A task's aggregated metrics, examples scored, chance accuracy (mean 1/choices; 0 for generation) and
    one record per example."""

    metrics: dict[str, float]
    n: int
    chance: float
    samples: list[dict] = field(default_factory=list)


def first_max(values: list[float]) -> int:
    """numpy.argmax: the first index of the largest value."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def run_task(
    spec: TaskSpec, docs: Documents, scorer: Scorer, num_fewshot: int, limit: int | None, progress: Progress
) -> TaskResult:
    """Score the first `limit` documents (all: None) with `num_fewshot` examples in each prompt."""
    chosen = docs.docs[:limit] if limit is not None else docs.docs
    if spec.output_type == "multiple_choice":
        return _multiple_choice(spec, docs, scorer, chosen, num_fewshot, progress)
    if spec.output_type == "generate_until":
        return _generate(spec, docs, scorer, chosen, num_fewshot, progress)
    return _rolling(spec, docs, scorer, chosen, progress)


def _gold(spec: TaskSpec, docs: Documents, doc: dict, index: int, choices: list[str]) -> list[int]:
    """The correct choice indices of a multiple-choice document; a bad one is a UserError naming the record."""
    key = "doc_to_text" if docs.multiple_input else "doc_to_target"
    gold = docs.text(doc, index) if docs.multiple_input else docs.target(doc, index)
    golds = gold if isinstance(gold, list) else [gold]
    indices = []
    for value in golds:
        if isinstance(value, str):
            if value not in choices:
                raise UserError(f"{spec.file}: record {index}: {key}: '{value}' is not one of the choices {choices}")
            value = choices.index(value)
        if not isinstance(value, int) or not 0 <= value < len(choices):
            raise UserError(
                f"{spec.file}: record {index}: {key}: gold index {value!r} is out of range for {len(choices)} choices"
            )
        indices.append(value)
    return indices


def _multiple_choice(
    spec: TaskSpec, docs: Documents, scorer: Scorer, chosen: list[dict], k: int, progress: Progress
) -> TaskResult:
    texts: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    samples: list[dict[str, Any]] = []
    for index, doc in enumerate(chosen):
        choices = docs.choices(doc, index)
        context = docs.context(doc, index, k)
        gold = _gold(spec, docs, doc, index, choices)
        if docs.multiple_input:  # each choice completes the context; the shared target is scored
            target = docs.target(doc, index)
            requests = [(c, f"{spec.target_delimiter}{target}") for c in context]
        else:
            requests = [(str(context), f"{spec.target_delimiter}{c}") for c in choices]
        spans.append((len(texts), len(requests)))
        texts += requests
        samples.append({"doc_id": index, "context": context, "choices": choices, "gold": gold})
    pairs = [scorer.pair(context, continuation) for context, continuation in texts]  # every record checked first
    results = scorer.loglikelihoods(pairs, progress)
    names = [name for name, _ in spec.metrics]
    for sample, (start, count) in zip(samples, spans, strict=True):
        lls = [results[start + j][0] for j in range(count)]
        choices = sample["choices"]
        preds = {
            "acc": first_max(lls),
            "acc_norm": first_max([ll / len(c) for ll, c in zip(lls, choices, strict=True)]),
            "acc_bytes": first_max([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices, strict=True)]),
        }
        sample.update(loglikelihoods=lls, is_greedy=[results[start + j][1] for j in range(count)], pred=preds["acc"])
        sample.update({name: float(preds[name] in sample["gold"]) for name in names})
    metrics = {name: _mean([s[name] for s in samples]) for name in names}
    chance = _mean([1.0 / len(s["choices"]) for s in samples])
    return TaskResult(metrics, len(samples), chance, samples)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _filtered(response: str, steps: list[tuple[str, dict]]) -> str:
    """lm-evaluation-harness's filters on one response: regex (findall, group_select, fallback), take_first,
    lowercase, uppercase, remove_whitespace."""
    for function, options in steps:
        if function == "regex":
            found: Any = re.findall(options.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), response)
            if found:
                found = found[options.get("group_select", 0)]
                if isinstance(found, tuple):
                    found = next((m for m in found if m), options.get("fallback", "[invalid]"))
                response = found.strip()
            else:
                response = options.get("fallback", "[invalid]")
        elif function == "lowercase":
            response = response.lower()
        elif function == "uppercase":
            response = response.upper()
        elif function == "remove_whitespace":
            response = response.strip()
    return response


def exact_match(prediction: str, reference: str, options: dict) -> float:
    """lm-evaluation-harness's exact_match (from HF evaluate): regexes_to_ignore removed, then optionally case
    and punctuation ignored."""
    for pattern in options.get("regexes_to_ignore") or []:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if options.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    if options.get("ignore_punctuation"):
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def _generate(
    spec: TaskSpec, docs: Documents, scorer: Scorer, chosen: list[dict], k: int, progress: Progress
) -> TaskResult:
    contexts, golds = [], []
    for index, doc in enumerate(chosen):
        contexts.append(str(docs.context(doc, index, k)))
        gold = docs.target(doc, index)
        if spec.doc_to_choice is not None:
            choices = docs.choices(doc, index)
            if not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise UserError(f"{spec.file}: record {index}: doc_to_target: {gold!r} is not a choice index")
            gold = choices[gold]
        golds.append([str(g) for g in gold] if isinstance(gold, list) else [str(gold)])
    texts = scorer.generate(contexts, spec.until, spec.max_gen_toks, progress)
    samples = []
    for index, (context, text, gold) in enumerate(zip(contexts, texts, golds, strict=True)):
        sample: dict[str, Any] = {"doc_id": index, "context": context, "generated": text, "target": gold}
        for filter_name, steps in spec.filters:
            answer = _filtered(text, steps)
            sample[f"filtered,{filter_name}"] = answer
            for metric, options in spec.metrics:
                hit = max(exact_match(answer, g, options) for g in gold)
                sample[_key(metric, filter_name, spec)] = hit
        samples.append(sample)
    keys = [_key(m, f, spec) for f, _ in spec.filters for m, _ in spec.metrics]
    return TaskResult({key: _mean([s[key] for s in samples]) for key in keys}, len(samples), 0.0, samples)


def _key(metric: str, filter_name: str, spec: TaskSpec) -> str:
    """The metric's name; with several filters, lm-evaluation-harness's `metric,filter`."""
    return metric if len(spec.filters) == 1 else f"{metric},{filter_name}"


def _rolling(spec: TaskSpec, docs: Documents, scorer: Scorer, chosen: list[dict], progress: Progress) -> TaskResult:
    samples = []
    for index, doc in enumerate(chosen):
        text = docs.target(doc, index)
        if not isinstance(text, str):
            raise UserError(f"{spec.file}: record {index}: doc_to_target: gives {text!r}, not text")
        ll = scorer.rolling(text)
        samples.append(
            {"doc_id": index, "loglikelihood": ll, "words": len(re.split(r"\s+", text)), "bytes": len(text.encode())}
        )
        progress(1)
    total = sum(s["loglikelihood"] for s in samples)
    words, size = sum(s["words"] for s in samples), sum(s["bytes"] for s in samples)
    values = {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / size),
        "bits_per_byte": -total / size / math.log(2),
    }
    return TaskResult({name: values[name] for name, _ in spec.metrics}, len(samples), 0.0, samples)
