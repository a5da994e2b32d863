"""Corpus preparation at scale: lmtrain's whole preparation (read, encode, write shards) against the `tokenizers`
library's own `encode_batch` on the same text, tokenizer and cores; and lmtrain's peak memory.

    python scripts/bench_prepare.py --mb 1000              # generates /tmp/bench_prepare/<mb>mb/, then deletes it
    python scripts/bench_prepare.py --mb 200 --mb 400      # two sizes: peak memory must not grow with the corpus
    python scripts/bench_prepare.py --mb 20 --tokenizer bpe
    python scripts/bench_prepare.py --mb 50 --tokenizer bpe --bpe-sample-mb 50 --rounds 3

Each measurement runs in a fresh process (peak RSS is that process's). The BPE is trained on a 20 MB sample by
lmtrain and by the `tokenizers` library's own `Tokenizer.train` (GPT-2 pre-tokenizer, same trainer settings) on
the same file, alternately, and the times compared; lmtrain's is then used as an existing tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no what up more out who into them can "
    "def return self import class None True False print value data model token train loss step"
).split()


def generate(folder: Path, megabytes: int, file_mb: int = 100) -> None:
    """`megabytes` MB of word text in lines of ~80 characters, in files of `file_mb` MB."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    for number in range((megabytes + file_mb - 1) // file_mb):
        size = min(file_mb, megabytes - number * file_mb) * 1_000_000
        with open(folder / f"part_{number:04d}.txt", "w") as f:
            written = 0
            while written < size:
                block = rng.choice(words, (20_000, 14))
                text = "\n".join(" ".join(row) for row in block) + "\n"
                f.write(text)
                written += len(text)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """CPU time of this process, all threads: on a shared machine it counts the work, not the wait."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_library(folder: str, tokenizer_json: str, cap_mb: str, method: str) -> dict:
    """tokenizers' `method` (encode_batch or encode_batch_fast) over the corpus (its first `cap_mb` MB) in 1 MB
    pieces, 8 at a time; only encoding is timed."""
    from tokenizers import Tokenizer

    from lmtrain.data.corpus import read_text_pieces

    tokenizer = Tokenizer.from_file(tokenizer_json)
    seconds, size, batch = 0.0, 0, []

    def encode() -> float:
        started = time.perf_counter()
        getattr(tokenizer, method)(batch, add_special_tokens=False)
        return time.perf_counter() - started

    for path in sorted(Path(folder).glob("*.txt")):
        for piece in read_text_pieces(path, "bench"):
            batch.append(piece)
            size += len(piece.encode())
            if len(batch) == 8:
                seconds += encode()
                batch = []
            if size >= int(cap_mb) * 1_000_000:
                break
        if size >= int(cap_mb) * 1_000_000:
            break
    if batch:
        seconds += encode()
    return {"mb_per_s": size / 1e6 / seconds, "seconds": seconds, "peak_mb": _peak_mb()}


def measure_lmtrain(folder: str, tokenizer_json: str, cache: str) -> dict:
    """lmtrain's whole preparation of the corpus with an existing tokenizer: wall time and peak memory."""
    from lmtrain.config import DataConfig
    from lmtrain.data import tokens
    from lmtrain.data.tokenizer import end_of_text_id, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_json)
    size = sum(p.stat().st_size for p in Path(folder).glob("*.txt"))
    started = time.perf_counter()
    settings = tokens.corpus_settings(DataConfig(train=folder, val_fraction=0.01, cache_dir=cache))
    data = tokens.prepare(**settings, existing=tokenizer, end_of_text=end_of_text_id(tokenizer))
    seconds = time.perf_counter() - started
    tokens_count = len(data.train) + len(data.validation)
    return {"mb_per_s": size / 1e6 / seconds, "seconds": seconds, "peak_mb": _peak_mb(), "tokens": tokens_count}


def write_sample(folder: Path, out: Path, sample_mb: int) -> None:
    """The first `sample_mb` MB of the corpus, in one file: what both BPE trainings read."""
    with open(out, "w") as f:
        for path in sorted(folder.glob("*.txt")):
            with open(path) as source:
                while f.tell() < sample_mb * 1_000_000 and (line := source.readline()):
                    f.write(line)


def train_bpe(sample: str, out: str) -> dict:
    """lmtrain's BPE (4,096) trained on the sample file, read as lmtrain reads a corpus."""
    from lmtrain.data.corpus import read_text_pieces
    from lmtrain.data.tokenizer import build_tokenizer

    started, cpu = time.perf_counter(), _cpu_seconds()
    tokenizer = build_tokenizer("bpe", read_text_pieces(Path(sample), "bench"), 4096)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    tokenizer.save(out)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_mb()}


def train_bpe_library(sample: str, out: str) -> dict:
    """The `tokenizers` library's own byte-level BPE training on the same file (GPT-2's pre-tokenizer, the same
    trainer settings): the reference lmtrain's training time is compared with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet, show_progress=False
    )
    started, cpu = time.perf_counter(), _cpu_seconds()
    tokenizer.train([sample], trainer=trainer)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    tokenizer.save(out)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_mb()}


def compare_bpe_training(folder: Path, root: Path, out: str, sample_mb: int, rounds: int) -> None:
    """lmtrain's and the library's BPE training on one sample, alternated `rounds` times in fresh processes: the
    fastest of each in wall time and in CPU time (which another process's load on a shared machine hardly moves)."""
    sample = root / "bpe_sample.txt"
    write_sample(folder, sample, sample_mb)
    runs: dict[str, list[dict]] = {"train": [], "train_library": []}
    for _ in range(rounds):
        for what, done in runs.items():
            target = out if what == "train" else str(root / "bpe_library.json")
            done.append(_in_fresh_process(what, str(sample), target))
    for unit in ("seconds", "cpu_seconds"):
        ours, library = (min(r[unit] for r in runs[what]) for what in ("train", "train_library"))
        every = {what: ", ".join(f"{r[unit]:.1f}" for r in done) for what, done in runs.items()}
        print(
            f"BPE (4,096) on a {sample_mb} MB sample, {unit.replace('_', ' ')}, fastest of {rounds}: lmtrain "
            f"{ours:.1f}, tokenizers {library:.1f} (lmtrain/library {ours / library:.2f}); all: lmtrain "
            f"{every['train']}; tokenizers {every['train_library']}",
            flush=True,
        )


def _in_fresh_process(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure", *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, action="append", help="corpus size in MB (repeat for several)")
    parser.add_argument("--root", default="/tmp/bench_prepare")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], action="append", help="default: both")
    parser.add_argument("--library-mb", type=int, default=50, help="MB the library's throughput is measured on")
    parser.add_argument("--bpe-sample-mb", type=int, default=20, help="MB both BPE trainings learn from")
    parser.add_argument("--rounds", type=int, default=3, help="BPE trainings of each kind (the fastest counts)")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        what, *rest = args.measure
        measures = {"library": measure_library, "lmtrain": measure_lmtrain, "train": train_bpe}
        print(json.dumps({**measures, "train_library": train_bpe_library}[what](*rest)))
        return
    root = Path(args.root)
    for megabytes in args.mb or [1000]:
        folder = root / f"{megabytes}mb"
        try:
            generate(folder, megabytes)
            byte_json, bpe_json = str(root / "byte.json"), str(root / "bpe.json")
            from lmtrain.data.tokenizer import build_tokenizer

            build_tokenizer("byte", [], 0).save(byte_json)
            chosen = args.tokenizer or ["byte", "bpe"]
            if "bpe" in chosen:
                compare_bpe_training(folder, root, bpe_json, min(args.bpe_sample_mb, megabytes), args.rounds)
            for name in chosen:
                tokenizer_json = {"byte": byte_json, "bpe": bpe_json}[name]
                ours = _in_fresh_process("lmtrain", str(folder), tokenizer_json, str(root / f"cache_{name}"))
                shutil.rmtree(root / f"cache_{name}", ignore_errors=True)
                line = (
                    f"{megabytes} MB {name}: lmtrain {ours['mb_per_s']:.2f} MB/s ({ours['seconds']:.1f} s, "
                    f"{ours['tokens']:,} tokens, peak {ours['peak_mb']:.0f} MB)"
                )
                for method in ("encode_batch", "encode_batch_fast"):
                    cap = str(args.library_mb)
                    library = _in_fresh_process("library", str(folder), tokenizer_json, cap, method)
                    ratio = ours["mb_per_s"] / library["mb_per_s"]
                    line += f"; tokenizers {method} {library['mb_per_s']:.2f} MB/s (lmtrain/library {ratio:.0%})"
                print(line, flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
