"""nanoGPT's Shakespeare recipe against lmtrain's fast one, side by side on the same machine.

    python scripts/bench_shakespeare_fast.py [--data ../shared/data/tiny_shakespeare/input.txt] [--out DIR]
        [--steps-scale 1.0] [--threads 1] [--pair recipes|optimizers] [KEY=VALUE ...]

--pair recipes (the default) trains `+experiment=shakespeare_char` (nanoGPT's CPU recipe: AdamW, GPT-2
blocks, cosine, 2000 steps) and `+experiment=shakespeare_char_fast` (Muon, RoPE, RMSNorm, QK-norm, ReLU²,
zero-initialised projections, untied head, warmup-stable-decay, 1000 steps). --pair optimizers trains the fast
recipe twice, with Muon and with AdamW (optimizer=adamw optimizer.lr=3e-3), to compare the optimizers' step
times on the same model. The two runs start together, each a `lmtrain pretrain` process with `--threads`
threads, so that both see the same load on a shared machine; compare their ratios rather than absolute times.
KEY=VALUE overrides go to both runs (e.g. optimizer.muon_dtype=fp32). `--steps-scale` shortens both runs
alike. Prints, per run: final and best validation loss, wall time (the command's, start to end), training
throughput (the median of the logged tokens/s) and the ratios of the second run to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAIRS = {
    "recipes": {
        "base": (["+experiment=shakespeare_char"], 2000),
        "fast": (["+experiment=shakespeare_char_fast"], 1000),
    },
    "optimizers": {
        "adamw": (["+experiment=shakespeare_char_fast", "optimizer=adamw", "optimizer.lr=3e-3"], 1000),
        "muon": (["+experiment=shakespeare_char_fast"], 1000),
    },
}


def summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first window holds warm-up
    return {"final": losses[-1], "best": min(losses), "tokens_per_s": statistics.median(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"
    parser.add_argument("--data", default=str(default_data))
    parser.add_argument("--out", default="/tmp/lmtrain-bench-shakespeare")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="train this fraction of each run's steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--pair", choices=sorted(PAIRS), default="recipes")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for both runs")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs = {}
    for name, (experiment, steps) in PAIRS[args.pair].items():
        steps = max(1, round(steps * args.steps_scale))
        run_dir = Path(args.out) / f"{name}-{time.strftime('%H%M%S')}"
        command = [
            *experiment,
            f"data.train={args.data}",
            f"trainer.max_steps={steps}",
            f"trainer.checkpoint_every={steps}",
            f"trainer.eval_every={min(250, steps)}",
            "trainer.progress_bar=false",
            f"hydra.run.dir={run_dir}",
            *args.overrides,
        ]
        print(f"{name}: lmtrain pretrain {' '.join(command)}", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"{run_dir.name}.log"
        with log.open("w") as out:  # the child keeps its own copy of the file
            process = subprocess.Popen([sys.executable, "-m", "lmtrain", "pretrain", *command], env=env,
                                       stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        runs[name] = (process, run_dir, log, time.perf_counter())
    results: dict[str, dict] = {}
    while len(results) < len(runs):  # each run's wall time ends when its own process does
        for name, (process, run_dir, log, started) in runs.items():
            if name in results or process.poll() is None:
                continue
            if process.returncode != 0:
                sys.exit(f"{name} failed:\n{log.read_text()[-3000:]}")
            results[name] = {**summary(run_dir), "wall": time.perf_counter() - started}
        time.sleep(0.5)
    results = {name: results[name] for name in runs}  # in the pair's order
    print(f"\n{'run':<8} {'final val loss':>15} {'best val loss':>14} {'wall s':>8} {'tokens/s':>9}")
    for name, r in results.items():
        print(f"{name:<8} {r['final']:>15.4f} {r['best']:>14.4f} {r['wall']:>8.0f} {r['tokens_per_s']:>9.0f}")
    (first, a), (second, b) = results.items()
    print(f"{second} / {first}: wall {b['wall'] / a['wall']:.3f}, tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
