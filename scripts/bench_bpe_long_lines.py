"""Times BPE training on one long unbroken line (issue 12, case 3): `python scripts/bench_bpe_long_lines.py 400000`.
Before pieces were capped at 64 bytes, 200,000 letters took ~36 s and 400,000 ~128 s on 2 CPU cores."""

import random
import string
import sys
import time

from lmtrain.data.tokenizer import build_tokenizer

length = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
rng = random.Random(0)
line = "".join(rng.choice(string.ascii_letters) for _ in range(length))
start = time.perf_counter()
build_tokenizer("bpe", [line], 512)
print(f"{length:,} characters without a space: BPE (vocab 512) trained in {time.perf_counter() - start:.1f} s")
