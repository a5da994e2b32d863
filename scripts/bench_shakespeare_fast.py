"""nanoGPT's Shakespeare recipe against lmtrain's fast one, in one run on the same machine.

    python scripts/bench_shakespeare_fast.py [--data ../shared/data/tiny_shakespeare/input.txt] [--out DIR]
                                             [--steps-scale 1.0] [--only base|fast]

Trains `+experiment=shakespeare_char` (nanoGPT's CPU recipe: AdamW, GPT-2 blocks, cosine) and
`+experiment=shakespeare_char_fast` (Muon, RoPE, RMSNorm, QK-norm, ReLU², zero-initialised projections,
untied head, warmup-stable-decay) one after the other through the `lmtrain` CLI, and prints each one's final
validation loss, best validation loss and wall time (the command's, start to end). `--steps-scale` shortens
both runs alike, to check the script or compare the recipes early in training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cli_runner import lmtrain  # scripts/ is on sys.path when a script runs

RECIPES = {"base": "shakespeare_char", "fast": "shakespeare_char_fast"}
STEPS = {"base": 2000, "fast": 1000}  # as the experiment files set them


def validation_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["val_loss"] for r in records if "val_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"
    parser.add_argument("--data", default=str(default_data))
    parser.add_argument("--out", default="/tmp/lmtrain-bench-shakespeare")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="train this fraction of each recipe's steps")
    parser.add_argument("--only", choices=sorted(RECIPES), help="train one recipe only")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name, experiment in RECIPES.items():
        if args.only and name != args.only:
            continue
        steps = max(1, round(STEPS[name] * args.steps_scale))
        run_dir = out / f"{name}-{time.strftime('%H%M%S')}"
        print(f"{name}: +experiment={experiment}, {steps} steps", flush=True)
        started = time.perf_counter()
        lmtrain(
            "pretrain",
            f"+experiment={experiment}",
            f"data.train={args.data}",
            f"trainer.max_steps={steps}",
            f"trainer.checkpoint_every={steps}",
            "trainer.progress_bar=false",
            f"hydra.run.dir={run_dir}",
        )
        losses = validation_losses(run_dir)
        results[name] = (losses[-1], min(losses), time.perf_counter() - started)
    print(f"\n{'recipe':<8} {'final val loss':>15} {'best val loss':>14} {'wall s':>8}")
    for name, (final, best, wall) in results.items():
        print(f"{name:<8} {final:>15.4f} {best:>14.4f} {wall:>8.0f}")


if __name__ == "__main__":
    main()
