"""Encoding a chat data set: lmtrain's chat task against transformers' apply_chat_template on the same chats.

Builds a 49k-entry byte-level BPE holding ChatML's tokens and 2,400 conversations locally, then prints the
seconds each takes to render and tokenize them all (and checks that the ids agree).

    .venv/bin/python scripts/bench_chat_encoding.py [--chats 2400] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chat_templates import CHATML  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from lmtrain.data.tokenizer import plain_text  # noqa: E402
from lmtrain.tasks.base import TaskInfo  # noqa: E402
from lmtrain.tasks.chat import Chat  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def words(rng: random.Random, count: int) -> list[str]:
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiouy"] + list("aeiou")
    return ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(count)]


def tokenizer_of(vocab_size: int, rng: random.Random) -> Tokenizer:
    lexicon = words(rng, 60000)
    lines = (" ".join(rng.choices(lexicon, k=200)) for _ in range(8000))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return plain_text(tokenizer)


def chats(rng: random.Random, count: int) -> list[dict]:
    lexicon = words(rng, 5000)

    def text() -> str:
        return " ".join(rng.choices(lexicon, k=rng.randint(10, 80))).capitalize() + "."

    records = []
    for _ in range(count):
        turns = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        records.append({"messages": turns})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=2400)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    import transformers

    rng = random.Random(0)
    tokenizer = tokenizer_of(args.vocab, rng)
    records = chats(rng, args.chats)
    print(f"tokenizer: {tokenizer.get_vocab_size()} entries; {len(records)} conversations")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    start = time.perf_counter()
    expected = [hf.apply_chat_template(r["messages"], chat_template=CHATML)["input_ids"] for r in records]
    hf_seconds = time.perf_counter() - start

    task = Chat(
        TaskInfo("chat", {"messages": "messages"}), tokenizer, 4096, tokenizer.token_to_id("<|im_end|>"), CHATML
    )
    start = time.perf_counter()
    examples = task.encode(records, "data.train")
    lmtrain_seconds = time.perf_counter() - start
    same = sum(e.ids == x for e, x in zip(examples, expected, strict=True))
    print(f"transformers apply_chat_template: {hf_seconds:.2f} s")
    print(f"lmtrain chat task encode:         {lmtrain_seconds:.2f} s ({lmtrain_seconds / hf_seconds:.1f}x)")
    print(f"identical ids: {same} of {len(records)}")


if __name__ == "__main__":
    main()
