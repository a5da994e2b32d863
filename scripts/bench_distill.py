"""Distillation on real text: a 4-layer teacher, then a small student trained for the same steps with and
without `loss=distill`; and the teacher exported as int8 next to fp32.

    python scripts/bench_distill.py [--data ../shared/data/tiny_shakespeare/input.txt] [--steps 1500]

Character-level tiny Shakespeare (nanoGPT's CPU recipe shape for the teacher). Prints both students'
validation loss (the distilled one should be lower), and the int8 export's size and perplexity beside fp32.
Everything runs through the `lmtrain` CLI; outputs go under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli_runner import lmtrain  # scripts/ is on sys.path when a script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"
    parser.add_argument("--data", default=str(default_data))
    parser.add_argument("--out", default="/tmp/lmtrain-bench-distill")
    parser.add_argument("--teacher-steps", type=int, default=2500, help="training steps of the teacher")
    parser.add_argument("--steps", type=int, default=800, help="training steps of each student")
    args = parser.parse_args()
    out = Path(args.out)
    common = [
        f"data.train={args.data}",
        "data.tokenizer=char",
        "data.max_chars=null",
        "model.max_seq_len=64",
        "trainer.micro_batch_size=12",
        "trainer.eval_batches=40",
        "optimizer.lr=1e-3",
        "optimizer.betas=[0.9,0.99]",
        "scheduler.warmup_steps=100",
        "scheduler.min_lr=1e-4",
        "trainer.progress_bar=false",
    ]

    def steps(n: int) -> list[str]:
        return [f"trainer.max_steps={n}", f"trainer.eval_every={n // 5}", f"trainer.checkpoint_every={n}"]

    print(f"teacher: 4 layers x 128, {args.teacher_steps} steps", flush=True)
    lmtrain(
        "pretrain",
        "model=tiny",
        "model.d_model=128",
        "model.num_heads=4",
        "model.num_layers=4",
        *common,
        *steps(args.teacher_steps),
        f"hydra.run.dir={out / 'teacher'}",
    )
    student = ["model=tiny", "model.d_model=128", "model.num_heads=4", "model.num_layers=1"]
    print(f"student: 1 layer x 128, {args.steps} steps, hard labels only", flush=True)
    lmtrain("pretrain", *student, *common, *steps(args.steps), f"hydra.run.dir={out / 'student'}")
    print(f"student: 1 layer x 128, {args.steps} steps, distilled (T=2, alpha=0.5)", flush=True)
    lmtrain(
        "pretrain",
        *student,
        *common,
        *steps(args.steps),
        "loss=distill",
        f"loss.teacher={out / 'teacher'}",
        "loss.temperature=2.0",
        "loss.alpha=0.5",
        f"hydra.run.dir={out / 'distilled'}",
    )
    print("export the teacher in fp32 and as int8", flush=True)
    lmtrain("export", f"ckpt={out / 'teacher'}", f"out={out / 'teacher-fp32'}")
    lmtrain("export", f"ckpt={out / 'teacher'}", "quantize=int8", f"out={out / 'teacher-int8'}")

    result = {
        name: json.loads((out / name / "result.json").read_text()) for name in ("teacher", "student", "distilled")
    }
    fp32 = json.loads((out / "teacher-fp32" / "report.json").read_text())
    int8 = json.loads((out / "teacher-int8" / "report.json").read_text())
    print()
    for name in ("teacher", "student", "distilled"):
        r = result[name]
        print(
            f"{name:10s} val_loss {r['final_val_loss']:.4f} (best {r['best_val_loss']:.4f})  "
            f"{r['wall_seconds']:.0f} s  {r['tokens_per_s']:,.0f} tokens/s"
        )
    gain = result["student"]["final_val_loss"] - result["distilled"]["final_val_loss"]
    print(f"distillation lowers the student's validation loss by {gain:.4f}")
    for name, report in (("fp32", fp32), ("int8", int8)):
        print(
            f"teacher {name}   {report['bytes'] / 1e6:.3f} MB on disk  val_ppl {report['validation_after']['ppl']:.4f}"
        )


if __name__ == "__main__":
    main()
