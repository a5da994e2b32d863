"""Pretrain a small model on real text, then finetune it for sentiment and for English→French translation, each
with lmtrain's derived finetuning defaults and with hand-tuned settings.

    python scripts/bench_finetune.py [--data ../shared/data] [--out /tmp/lmtrain-bench] [--pretrain-steps 350]
                                     [--tasks sentiment translation] [--settings defaults tuned]
                                     [--tuned-extra KEY=VALUE ...] [--tag SUFFIX] [--quick]

The pretraining corpus is the text of both tasks' training splits (review sentences, English and French
sentences), so the model has seen the languages; labels and sentence pairs are only used in finetuning.
Pretraining: 4 layers × 192 (`model=modern_small`, `optimizer=muon`), a BPE vocabulary of 4096, 350 steps of
32 × 128 tokens; it is reused when its run dir exists. `defaults` finetunes with nothing but the task and its
data (lmtrain.train.finetune_defaults derives the rest); `tuned` adds TUNED (`--tuned-extra` adds more, e.g.
`trainer.early_stopping_patience=null`). Everything runs through the
`lmtrain` CLI as a user would; the script prints validation accuracy/F1 (sentiment, at the best checkpoint) and
BLEU/chrF on the whole validation split (translation, greedy, sacrebleu), with each run's steps and wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli_runner import lmtrain  # scripts/ is on sys.path when a script runs

# hand-tuned for translation before the defaults were derived; epochs=3 was then the default, capped by max_steps
TUNED = [
    "trainer.micro_batch_size=32",
    "optimizer.lr=1e-3",
    "trainer.max_steps=1500",
    "trainer.eval_every=100",
    "epochs=3",
]
TASKS = {"sentiment": "task=classification", "translation": "task=seq2seq"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/lmtrain-bench-finetune")
    parser.add_argument("--pretrain-steps", type=int, default=350)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--settings", nargs="+", choices=["defaults", "tuned"], default=["defaults", "tuned"])
    parser.add_argument("--tuned-extra", nargs="*", default=[], help="more overrides for the tuned runs")
    parser.add_argument("--tag", default="", help="appended to the finetuning runs' dir names")
    parser.add_argument("--quick", action="store_true", help="a fraction of the steps, to check the script")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = _pretrain(data, out, args.pretrain_steps // (10 if args.quick else 1))
    rows = [_pretrain_row(pretrained)]
    for name in args.tasks:
        for setting in args.settings:
            tuned = [*TUNED, *args.tuned_extra] if setting == "tuned" else []
            extra = tuned + (["trainer.max_steps=20"] if args.quick else [])
            print(f"finetuning {name} ({setting})", flush=True)
            rows.append(_finetune(name, setting + args.tag, data, out, pretrained, extra))
    print()
    print("\n".join(rows))


def _pretrain(data: Path, out: Path, steps: int) -> Path:
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
            "model.num_layers=4",
            "optimizer=muon",
            "scheduler=wsd",
            f"data.train={corpus}",
            "data.vocab_size=4096",
            f"trainer.max_steps={max(1, steps)}",
            "trainer.micro_batch_size=32",
            "trainer.eval_every=100",
            "trainer.checkpoint_every=100000",
            "trainer.progress_bar=false",
            f"hydra.run.dir={pretrained}",
        )
    return pretrained


def _pretrain_row(pretrained: Path) -> str:
    pre = json.loads((pretrained / "result.json").read_text())
    timing = f"({pre['steps']} steps, {pre['wall_seconds']:.0f} s)"
    return f"{'pretrain':<22} val_loss {pre['best_val_loss']:.3f}  {timing}"


def _finetune(name: str, setting: str, data: Path, out: Path, pretrained: Path, extra: list[str]) -> str:
    """One finetuning run; returns its line of the table."""
    run = out / f"{name}-{setting}"
    lmtrain(
        "finetune",
        f"init_from={pretrained}/checkpoints/latest",
        TASKS[name],
        f"data.train={data}/{name}/train.jsonl",
        f"data.validation={data}/{name}/validation.jsonl",
        *extra,
        "trainer.progress_bar=false",
        f"hydra.run.dir={run}",
    )
    result = json.loads((run / "result.json").read_text())
    timing = f"({result['steps']} steps, {result['wall_seconds']:.0f} s)"
    label = f"{name:<11} {setting:<9}"
    if name == "sentiment":
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        best = [r for r in records if r.get("val_accuracy") == result["best_val_accuracy"]][0]
        return f"{label}  val accuracy {best['val_accuracy']:.3f}  macro-F1 {best['val_f1']:.3f}  {timing}"
    print("  scoring translation on the whole validation split (greedy)", flush=True)
    lmtrain("evaluate", f"ckpt={run}/checkpoints/best", "split=validation", f"hydra.run.dir={run}/eval")
    mt = json.loads((run / "eval" / "eval.json").read_text())
    return f"{label}  val BLEU {mt['bleu']:.1f}  chrF {mt['chrf']:.1f} on {mt['num_examples']} pairs  {timing}"


if __name__ == "__main__":
    main()
