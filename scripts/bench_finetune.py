"""Pretrain a small model on real text, then finetune it for sentiment and for English→French translation.

    python scripts/bench_finetune.py [--data ../shared/data] [--out /tmp/lmtrain-bench] [--pretrain-steps 400]
                                     [--before] [--quick]

The pretraining corpus is the text of both tasks' training splits (review sentences, English and French
sentences), so the model has seen the languages; labels and sentence pairs are only used in finetuning.
Pretraining uses `model=modern_small` (width 192) with `optimizer=muon`; finetuning passes nothing but the
task and its data, so it measures lmtrain's finetuning defaults. `--before` finetunes with the defaults
lmtrain had before issue 16 instead (lr 1e-4, 10 warmup steps, no early stopping; the same step cap, and
pretraining is reused when its run dir exists). Everything runs through the `lmtrain` CLI as a user would;
the script prints validation accuracy/F1 (sentiment) and BLEU/chrF on the whole validation split
(translation, greedy, sacrebleu), with wall times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli_runner import lmtrain  # scripts/ is on sys.path when a script runs

BEFORE = ["optimizer.lr=1e-4", "scheduler.warmup_steps=10", "trainer.early_stopping_patience=null"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/lmtrain-bench-finetune")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--before", action="store_true", help="finetune with the defaults before issue 16")
    parser.add_argument("--quick", action="store_true", help="a fraction of the steps, to check the script")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = ["trainer.max_steps=20"] if args.quick else []
    extra = (BEFORE if args.before else []) + quick + ["trainer.progress_bar=false"]
    tag = "before" if args.before else "defaults"

    corpus = out / "corpus.txt"
    with corpus.open("w") as f:
        for line in (data / "sentiment" / "train.jsonl").read_text().splitlines():
            f.write(json.loads(line)["text"] + "\n")
        for line in (data / "translation" / "train.jsonl").read_text().splitlines():
            pair = json.loads(line)
            f.write(pair["source"] + "\n" + pair["target"] + "\n")

    pretrained = out / "pretrain"
    if not (pretrained / "result.json").is_file():
        print("pretraining on the tasks' text", flush=True)
        lmtrain(
            "pretrain",
            "model=modern_small",
            "model.d_model=192",
            "optimizer=muon",
            "scheduler=wsd",
            f"data.train={corpus}",
            "data.vocab_size=4096",
            f"trainer.max_steps={max(1, args.pretrain_steps // (10 if args.quick else 1))}",
            "trainer.micro_batch_size=16",
            "trainer.eval_every=100",
            "trainer.checkpoint_every=100000",
            "trainer.progress_bar=false",
            f"hydra.run.dir={pretrained}",
        )
    init = f"init_from={pretrained}/checkpoints/latest"

    print(f"finetuning ({tag}): sentiment classification", flush=True)
    sentiment = out / f"sentiment-{tag}"
    task = ["task=classification", f"data.train={data}/sentiment/train.jsonl"]
    lmtrain(
        "finetune",
        init,
        *task,
        f"data.validation={data}/sentiment/validation.jsonl",
        *extra,
        f"hydra.run.dir={sentiment}",
    )

    print(f"finetuning ({tag}): English→French translation", flush=True)
    translation = out / f"translation-{tag}"
    task = ["task=seq2seq", f"data.train={data}/translation/train.jsonl"]
    if args.before:
        extra = [*extra, "task.max_eval_examples=null"]
    lmtrain(
        "finetune",
        init,
        *task,
        f"data.validation={data}/translation/validation.jsonl",
        *extra,
        f"hydra.run.dir={translation}",
    )
    print("scoring translation on the whole validation split (greedy)", flush=True)
    lmtrain("evaluate", f"ckpt={translation}/checkpoints/best", "split=validation", f"hydra.run.dir={translation}/eval")

    pre = json.loads((pretrained / "result.json").read_text())
    cls = json.loads((sentiment / "result.json").read_text())
    mt_run = json.loads((translation / "result.json").read_text())
    mt = json.loads((translation / "eval" / "eval.json").read_text())
    records = map(json.loads, (sentiment / "metrics.jsonl").read_text().splitlines())
    cls_metrics = [r for r in records if r.get("val_accuracy") == cls["best_val_accuracy"]][0]
    print()
    print(
        f"pretrain      best val_loss {pre['best_val_loss']:.3f}  ({pre['steps']} steps, {pre['wall_seconds']:.0f} s)"
    )
    print(
        f"sentiment     val accuracy {cls_metrics['val_accuracy']:.3f}  macro-F1 {cls_metrics['val_f1']:.3f}  "
        f"({cls['steps']} steps, {cls['wall_seconds']:.0f} s)"
    )
    print(
        f"translation   val BLEU {mt['bleu']:.1f}  chrF {mt['chrf']:.1f}  on {mt['num_examples']} pairs  "
        f"({mt_run['steps']} steps, {mt_run['wall_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
