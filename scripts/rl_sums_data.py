"""Writes the data of docs/rl.md's toy task (sums of two one-digit numbers) into a folder:
sums.txt (pretraining lines "3+4=7"), sums_sft.jsonl (prompt/response), sums_rl.jsonl and sums_val.jsonl
(prompt/answer). Usage: python scripts/rl_sums_data.py [folder]"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def record(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)}


def main(folder: Path) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("sums_sft", 2000), ("sums_rl", 2000), ("sums_val", 64)):
        lines = [json.dumps(record(rng)) for _ in range(n)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    lines = [f"{r['prompt']}{r['response']}" for r in (record(rng) for _ in range(3000))]
    (folder / "sums.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote sums.txt, sums_sft.jsonl, sums_rl.jsonl, sums_val.jsonl in {folder}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
