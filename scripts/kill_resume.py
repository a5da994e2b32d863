"""Kill runs and resume them: the result must be bitwise the uninterrupted run's, with nothing left behind.

Each trial starts `lmtrain pretrain`, kills it with SIGKILL (at a random moment, or at an exact place: inside a
checkpoint write, at an fsync, right after the commit rename, before `latest` is repointed, while pruning,
inside the rewrite of metrics.jsonl on resume), resumes with trainer.resume=true until the run completes, then
checks: weights and optimizer state bitwise equal to an uninterrupted run, the same metrics.jsonl records
(but the measured speed), result.json completed, and no leftovers in the run dir. Not part of `make test`:

    python scripts/kill_resume.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

SETTINGS = [
    "model=tiny",
    "model.max_seq_len=32",
    "data.tokenizer=char",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=16",
    "trainer.eval_every=4",
    "trainer.eval_batches=2",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "trainer.keep_last=2",
    "trainer.progress_bar=false",
    "scheduler.warmup_steps=2",
    "trainer.device=cpu",
]

# Loaded into the run's interpreter (as sitecustomize): SIGKILL at the n-th call of one operation.
HOOK = r"""
import os, shutil, signal
where, nth = os.environ["KILL_AT"].rsplit(":", 1)
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == int(nth)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "save_file":  # inside a checkpoint write: some files staged, some not
    import lmtrain.checkpoint.files as ckpt
    real_save = ckpt.save_file
    def save_file(*a, **k):
        if due(): die()
        return real_save(*a, **k)
    ckpt.save_file = save_file
elif where == "fsync":
    real_fsync = os.fsync
    def fsync(fd):
        if due(): die()
        return real_fsync(fd)
    os.fsync = fsync
elif where == "after_rename":  # the checkpoint is in place, `latest` not yet repointed
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        if "step_" in str(dst) and ".tmp-" in str(src) and due(): die()
    os.rename = rename
elif where in ("latest", "rewrite"):  # before `latest` is replaced / before the new metrics.jsonl replaces the old
    name = "latest" if where == "latest" else "metrics.jsonl"
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(str(dst)) == name and due(): die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif where == "prune":  # half way through deleting a pruned checkpoint
    real_rmtree = shutil.rmtree
    def rmtree(path, *a, **k):
        if str(path).endswith("tmp-pruned") and due():
            os.remove(os.path.join(path, "model.safetensors"))
            die()
        return real_rmtree(path, *a, **k)
    shutil.rmtree = rmtree
"""

EXPECTED_IN_RUN_DIR = {
    ".hydra",
    ".lock",
    "checkpoints",
    "metrics.jsonl",
    "pretrain.log",
    "result.json",
    "tokenizer.json",
}


def write_corpus(path: Path) -> None:
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat log big small red blue".split()
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(8)) + ".\n" for _ in range(3000)))


def start(run_dir: Path, corpus: Path, resume: bool, env: dict) -> subprocess.Popen:
    args = [*SETTINGS, f"data.train={corpus}", f"hydra.run.dir={run_dir}", f"trainer.resume={str(resume).lower()}"]
    return subprocess.Popen(
        [sys.executable, "-m", "lmtrain", "pretrain", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


SPEED = ("tokens_per_s", "mfu")  # what the clock measures: differs between any two runs


def records(run_dir: Path) -> list[dict]:
    from lmtrain.train.sinks import read_metrics

    return [{k: v for k, v in r.items() if k not in SPEED} for r in read_metrics(run_dir / "metrics.jsonl")]


def problems(run_dir: Path, reference: Path) -> list[str]:
    found = []
    result = json.loads((run_dir / "result.json").read_text())
    if result["status"] != "completed":
        found.append(f"result.json says {result['status']}: {result.get('error')}")
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(reference / "checkpoints" / "latest" / name))
        b = load_file(str(run_dir / "checkpoints" / "latest" / name))
        differ = [k for k in a if k not in b or not a[k].equal(b[k])]
        if a.keys() != b.keys() or differ:
            found.append(f"{name} differs from the uninterrupted run ({differ[:3]})")
    if records(run_dir) != records(reference):
        found.append("metrics.jsonl records differ from the uninterrupted run's")
    extra = sorted({p.name for p in run_dir.iterdir()} - EXPECTED_IN_RUN_DIR)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    expected_ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    if extra or ckpts != expected_ckpts:
        found.append(f"leftovers: run dir {extra}, checkpoints {ckpts} (expected {expected_ckpts})")
    return found


def trial(kind: str, run_dir: Path, corpus: Path, reference: Path, wall: float, rng: random.Random) -> list[str]:
    """Kill a run (once or twice), resume until it completes, and list what is wrong (nothing, if all is well)."""
    env = {k: v for k, v in os.environ.items() if k != "KILL_AT"}
    hooked = {**env, "PYTHONPATH": f"{run_dir.parent / 'hook'}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    kills = []
    if kind == "random":
        plan = [("random", None) for _ in range(rng.choice([1, 2]))]
    elif kind == "rewrite":  # a first kill leaves a checkpoint; the resume is killed inside the metrics rewrite
        plan = [("save_file", f"save_file:{rng.randint(4, 12)}"), ("rewrite", "rewrite:1")]
    else:
        nth = {"save_file": rng.randint(1, 24), "fsync": rng.randint(1, 60), "prune": rng.randint(1, 5)}
        plan = [(kind, f"{kind}:{nth.get(kind, rng.randint(1, 7))}")]
    for attempt, (what, kill_at) in enumerate(plan):
        resume = attempt > 0
        process = start(run_dir, corpus, resume, env if kill_at is None else {**hooked, "KILL_AT": kill_at})
        if kill_at is None:
            try:
                process.wait(timeout=rng.uniform(0.3, wall))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        kills.append("killed" if process.returncode == -signal.SIGKILL else f"rc {process.returncode}")
        if process.returncode not in (0, -signal.SIGKILL):
            return [f"{what} attempt {attempt} failed: {stderr.strip().splitlines()[-1:]}"]
    final = start(run_dir, corpus, True, env)
    _, stderr = final.communicate()
    if final.returncode != 0:
        return [f"resume failed after {kills}: {stderr.strip().splitlines()[-1:]}"]
    return problems(run_dir, reference)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="random-kill trials (and as many targeted ones)")
    parser.add_argument("--kinds", default="", help="comma-separated targeted kinds to run (default: all of them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lmtrain-kill-"))
    os.environ.setdefault("LMTRAIN_CACHE", str(work / "cache"))
    (work / "hook").mkdir()
    (work / "hook" / "sitecustomize.py").write_text(HOOK)
    corpus = work / "corpus.txt"
    write_corpus(corpus)
    reference = work / "reference"
    started = time.time()
    process = start(reference, corpus, False, dict(os.environ))
    _, stderr = process.communicate()
    if process.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{stderr[-3000:]}")
    wall = time.time() - started
    print(f"uninterrupted run: {wall:.1f} s", flush=True)

    targeted = (
        args.kinds.split(",") if args.kinds else ["save_file", "fsync", "after_rename", "latest", "prune", "rewrite"]
    )
    kinds = [kind for i in range(args.trials) for kind in ("random", targeted[i % len(targeted)])]
    failures = 0
    for number, kind in enumerate(kinds):
        run_dir = work / f"trial{number:03d}"
        found = trial(kind, run_dir, corpus, reference, wall, rng)
        failures += bool(found)
        print(f"trial {number:3d} {kind:12s} {'FAIL ' + '; '.join(found) if found else 'ok'}", flush=True)
        if not found:
            shutil.rmtree(run_dir)
    print(f"{len(kinds) - failures} of {len(kinds)} trials ok ({args.trials} random kills, {args.trials} targeted)")
    if not args.keep and not failures:
        shutil.rmtree(work)
    else:
        print(f"work folder: {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
