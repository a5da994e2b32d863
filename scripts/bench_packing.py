"""Packed against unpacked finetuning batches on the sentiment (as language modelling) and translation (as seq2seq)
data in ../shared/data: the padding fraction of a whole epoch, and training tokens/s (real, non-padding tokens)
of the same model on each, alternating in one process.

    .venv/bin/python scripts/bench_packing.py [--data ../shared/data] [--steps 20] [--batch 16] [--context 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from lmtrain.data.examples import ExampleBatches, collate, collate_packed
from lmtrain.data.tokenizer import byte_tokenizer, end_of_text_id
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.seq2seq import Seq2Seq
from lmtrain.train.losses import cross_entropy


def examples(data: Path, name: str, tokenizer, context: int) -> list:
    records = [json.loads(line) for line in (data / name / "train.jsonl").read_text().splitlines()]
    task = LanguageModelling if name == "sentiment" else Seq2Seq
    return task(task.plain_info(), tokenizer, context, end_of_text_id(tokenizer)).encode(records, "data.train")


def layout(batches: ExampleBatches) -> list[list[int]]:
    """Input tokens of each row of each batch of the first epoch (the order next_step walks)."""
    length = [len(e.ids) - 1 for e in batches.examples]
    rows = batches._epoch_order(0)  # noqa: SLF001 (a benchmark may look inside)
    if batches.pack_width is None:
        return [[length[i] for i in batch] for batch in rows]
    return [[sum(length[i] for i in row) for row in batch] for batch in rows]


def padding_fraction(rows: list[list[int]]) -> float:
    """Share of the input positions of an epoch's batches that hold padding (each batch is as wide as its
    longest row)."""
    total = sum(max(batch) * len(batch) for batch in rows)
    return 1 - sum(sum(batch) for batch in rows) / total


def train_speed(model: TransformerLM, batches: ExampleBatches, rows: list[list[int]], steps: int) -> float:
    """Real (non-padding) input tokens per second of forward, backward and AdamW steps from the epoch's start."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches.load_state_dict({"epoch": torch.tensor([0]), "position": torch.tensor([0])})
    start = time.perf_counter()
    for _ in range(steps):
        inputs, targets = batches.next_step(1)[0]
        logits = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        total, count = cross_entropy(logits, targets)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(sum(batch) for batch in rows[:steps]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = byte_tokenizer()  # padding is the end-of-text id 256, which no input text holds
    config = TransformerConfig(
        vocab_size=257,
        d_model=256,
        num_heads=4,
        num_layers=4,
        max_seq_len=args.context,
        position="rope",
        norm="rmsnorm",
        activation="swiglu",
    )
    for name in ("sentiment", "translation"):
        data = examples(Path(args.data), name, tokenizer, args.context)
        runs = {}
        for label, width in (("unpacked", None), ("packed", args.context)):
            batch = partial(collate if width is None else collate_packed, pad_id=256, ignore_index=-100)
            batches = ExampleBatches(data, args.batch, 0, batch, pack_width=width)
            runs[label] = (batches, layout(batches))
        speeds: dict[str, list[float]] = {"unpacked": [], "packed": []}
        for _ in range(args.repeats):  # alternate, so machine noise hits both alike
            for label in speeds:
                torch.manual_seed(0)
                speeds[label].append(train_speed(TransformerLM(config), *runs[label], args.steps))
        print(f"{name}: {len(data):,} examples, batch {args.batch}, context {args.context}")
        for label, (_, rows) in runs.items():
            speed = statistics.median(speeds[label])
            padding = padding_fraction(rows)
            print(f"  {label:<9} padding {padding:6.1%}  {len(rows):5,} batches/epoch  {speed:9,.0f} real tokens/s")
        ratio = statistics.median(speeds["packed"]) / statistics.median(speeds["unpacked"])
        print(f"  packed / unpacked real tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
