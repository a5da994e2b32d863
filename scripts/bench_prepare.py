"""Corpus preparation at scale: lmtrain's whole preparation (read, encode, write shards) against the `tokenizers`
library's own `encode_batch` on the same text, tokenizer and cores; and lmtrain's peak memory.

    python scripts/bench_prepare.py --mb 1000              # generates /tmp/bench_prepare/<mb>mb/, then deletes it
    python scripts/bench_prepare.py --mb 200 --mb 400      # two sizes: peak memory must not grow with the corpus
    python scripts/bench_prepare.py --mb 20 --tokenizer bpe

Each measurement runs in a fresh process (peak RSS is that process's). The BPE is trained once on a 20 MB sample
(reported separately) and then used as an existing tokenizer.json, like a pretrained model's.
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


def train_bpe(folder: str, out: str, sample_mb: int = 20) -> dict:
    from lmtrain.data.corpus import read_text_pieces
    from lmtrain.data.tokenizer import build_tokenizer

    def sample():
        taken = 0
        for path in sorted(Path(folder).glob("*.txt")):
            for piece in read_text_pieces(path, "bench"):
                if taken >= sample_mb * 1_000_000:
                    return
                taken += len(piece)
                yield piece

    started = time.perf_counter()
    build_tokenizer("bpe", sample(), 4096).save(out)
    return {"seconds": time.perf_counter() - started, "sample_mb": sample_mb, "peak_mb": _peak_mb()}


def _in_fresh_process(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure", *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, action="append", help="corpus size in MB (repeat for several)")
    parser.add_argument("--root", default="/tmp/bench_prepare")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], action="append", help="default: both")
    parser.add_argument("--library-mb", type=int, default=50, help="MB the library's throughput is measured on")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        what, *rest = args.measure
        print(json.dumps({"library": measure_library, "lmtrain": measure_lmtrain, "train": train_bpe}[what](*rest)))
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
                trained = _in_fresh_process("train", str(folder), bpe_json)
                sample = trained["sample_mb"]
                print(f"{megabytes} MB: BPE (4,096) trained on a {sample} MB sample in {trained['seconds']:.1f} s")
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
