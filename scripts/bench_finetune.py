"""Pretrain a small model on real text, then finetune it for sentiment and for English→French translation.

    python scripts/bench_finetune.py [--data ../shared/data] [--out /tmp/lmtrain-bench] [--quick]

The pretraining corpus is the text of both tasks' training splits (review sentences, English and French
sentences), so the model has seen the languages; labels and sentence pairs are only used in finetuning.
Everything runs through the `lmtrain` CLI as a user would; the script prints validation accuracy/F1
(sentiment, data/sentiment) and BLEU/chrF (translation, data/translation, sacrebleu), with wall times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli_runner import lmtrain  # scripts/ is on sys.path when a script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/lmtrain-bench-finetune")
    parser.add_argument("--quick", action="store_true", help="a fraction of the steps, to check the script")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = 0.1 if args.quick else 1.0

    corpus = out / "corpus.txt"
    with corpus.open("w") as f:
        for line in (data / "sentiment" / "train.jsonl").read_text().splitlines():
            f.write(json.loads(line)["text"] + "\n")
        for line in (data / "translation" / "train.jsonl").read_text().splitlines():
            pair = json.loads(line)
            f.write(pair["source"] + "\n" + pair["target"] + "\n")

    print("pretraining on the tasks' text", flush=True)
    pretrained = out / "pretrain"
    lmtrain(
        "pretrain",
        "model=llama_small",
        "model.d_model=192",
        "model.max_seq_len=128",
        f"data.train={corpus}",
        "data.vocab_size=4096",
        f"trainer.max_steps={int(700 * scale)}",
        "trainer.micro_batch_size=16",
        "trainer.eval_every=200",
        "trainer.checkpoint_every=100000",
        "scheduler.warmup_steps=50",
        "optimizer.lr=2e-3",
        "trainer.progress_bar=false",
        f"hydra.run.dir={pretrained}",
    )

    print("finetuning: sentiment classification", flush=True)
    sentiment = out / "sentiment"
    lmtrain(
        "finetune",
        f"init_from={pretrained}",
        "task=classification",
        f"data.train={data}/sentiment/train.jsonl",
        f"data.validation={data}/sentiment/validation.jsonl",
        f"epochs={4 * scale}",
        "optimizer.lr=3e-4",
        "trainer.micro_batch_size=32",
        "trainer.progress_bar=false",
        f"hydra.run.dir={sentiment}",
    )

    print("finetuning: English→French translation", flush=True)
    translation = out / "translation"
    lmtrain(
        "finetune",
        f"init_from={pretrained}",
        "task=seq2seq",
        f"data.train={data}/translation/train.jsonl",
        f"data.validation={data}/translation/validation.jsonl",
        f"epochs={1 * scale}",
        "optimizer.lr=1e-3",
        "trainer.micro_batch_size=32",
        "evals_per_epoch=1",
        "task.max_eval_examples=300",
        "trainer.progress_bar=false",
        f"hydra.run.dir={translation}",
    )
    print("scoring translation on the whole validation split (greedy)", flush=True)
    lmtrain("evaluate", f"ckpt={translation}/checkpoints/best", "split=validation", f"hydra.run.dir={translation}/eval")

    pre = json.loads((pretrained / "result.json").read_text())
    cls = json.loads((sentiment / "result.json").read_text())
    mt = json.loads((translation / "eval" / "eval.json").read_text())
    cls_metrics = [
        r
        for r in map(json.loads, (sentiment / "metrics.jsonl").read_text().splitlines())
        if r.get("val_accuracy") == cls["best_val_accuracy"]
    ][0]
    print()
    print(
        f"pretrain      best val_loss {pre['best_val_loss']:.3f}  ({pre['steps']} steps, {pre['wall_seconds']:.0f} s)"
    )
    print(
        f"sentiment     val accuracy {cls_metrics['val_accuracy']:.3f}  macro-F1 {cls_metrics['val_f1']:.3f}  "
        f"({cls['wall_seconds']:.0f} s)"
    )
    print(f"translation   val BLEU {mt['bleu']:.1f}  chrF {mt['chrf']:.1f}  on {mt['num_examples']} pairs")


if __name__ == "__main__":
    main()
