"""Task metrics: perplexity, accuracy, macro-F1 with per-class precision/recall, BLEU and chrF
(sacrebleu), and SQuAD-style exact match and token F1."""

from __future__ import annotations

import math
import re
import string
from collections import Counter


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def classification_report(predictions: list[int], labels: list[int], names: list[str]) -> dict:
    """accuracy, macro-F1 and per-class precision/recall/F1/support."""
    per_class = {}
    for index, name in enumerate(names):
        true_pos = sum(p == index and y == index for p, y in zip(predictions, labels, strict=True))
        predicted = sum(p == index for p in predictions)
        actual = sum(y == index for y in labels)
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": actual,
            "predicted": predicted,
        }
    # macro average over the classes that occur in the labels or the predictions (as scikit-learn does)
    present = [c for c in per_class.values() if c["support"] or c["predicted"]] or list(per_class.values())
    return {
        "accuracy": sum(p == y for p, y in zip(predictions, labels, strict=True)) / max(len(labels), 1),
        "f1": sum(c["f1"] for c in present) / max(len(present), 1),
        "per_class": per_class,
    }


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF by sacrebleu (default 13a tokenization), on a 0-100 scale."""
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def rouge(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L (Lin 2004) by Google's `rouge-score`, the reference reimplementation of
    ROUGE-1.5.5: each pair's F-measure with its default tokenizer (lower case, ASCII letters and digits) and the
    Porter stemmer, averaged over pairs, on a 0-100 scale like BLEU and chrF. rouge_l is sentence-level LCS
    (rouge-score's `rougeL`)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        for name, score in scorer.score(reference, hypothesis).items():
            totals[name] += score.fmeasure
    count = max(len(hypotheses), 1)
    return {
        "rouge1": 100 * totals["rouge1"] / count,
        "rouge2": 100 * totals["rouge2"] / count,
        "rouge_l": 100 * totals["rougeL"] / count,
    }


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    count = max(len(references), 1)
    return {
        "exact_match": sum(
            normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
        )
        / count,
        "f1": sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / count,
    }
