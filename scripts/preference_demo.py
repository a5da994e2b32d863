"""The worked example of docs/preference.md: a tiny character-level model is pretrained, instruction-tuned on
answers that say "yes." or "no." at random, then DPO-tuned to prefer "yes."; prints the held-out reward
accuracy before and after, and the share of sampled answers that are "yes." before and after.

    .venv/bin/python scripts/preference_demo.py [--out /tmp/preference_demo] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.cli import check
from lmtrain.commands import evaluate, finetune, pretrain
from lmtrain.config import EvaluateConfig, FinetuneConfig, PretrainConfig
from lmtrain.model.generate import generate
from lmtrain.tasks.base import load_task_info
from lmtrain.tasks.registry import task_for

ANIMALS = "cat dog cow pig hen fox owl bat rat ant bee elk yak emu ape eel".split()
TRAIN, HELD_OUT = ANIMALS[:11], ANIMALS[11:]
COMMON = ["trainer.device=cpu", "trainer.progress_bar=false", "scheduler.warmup_steps=5"]


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def answers(ckpt: str, prompts: list[str], samples: int = 20) -> list[str]:
    """Answers sampled (temperature 0.7, seed 0) after each prompt, `samples` each."""
    model, tokenizer = load_model(ckpt, torch.device("cpu"))
    info = load_task_info(ckpt)
    assert info is not None
    task = task_for(info, tokenizer, model.config.max_seq_len, load_special_tokens(ckpt, tokenizer))
    generator = torch.Generator().manual_seed(0)
    texts = []
    model.eval()
    for prompt in prompts:
        ids = torch.tensor([task.prompt_ids({info.fields["prompt"]: prompt})] * samples)
        with torch.no_grad():
            out = generate(model, ids, 6, temperature=0.7, generator=generator, stop_tokens=[task.eot])
        for row in out[:, ids.shape[1] :].tolist():
            texts.append(tokenizer.decode(row[: row.index(task.eot)] if task.eot in row else row).strip())
    return texts


def yes_share(texts: list[str]) -> float:
    return sum(t == "yes." for t in texts) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/preference_demo")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    out, rng = Path(args.out), random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"the {rng.choice(ANIMALS)} says {rng.choice(['yes', 'no'])}." for _ in range(4000)]
    (out / "corpus.txt").write_text("\n".join(lines) + "\n")
    base = ["model=tiny", "model.max_seq_len=32", "data.tokenizer=char", f"data.train={out / 'corpus.txt'}"]
    pretrain.run(check("pretrain", PretrainConfig, [*base, "trainer.max_steps=200", *COMMON]), str(out / "base"))
    sft = [{"prompt": f"does the {a} say yes", "response": rng.choice(["yes.", "no."])} for a in ANIMALS * 20]
    sft_run = [f"init_from={out / 'base'}", f"data.train={write(out / 'sft.jsonl', sft)}", "task=lm", "epochs=2"]
    finetune.run(check("finetune", FinetuneConfig, [*sft_run, *COMMON]), str(out / "sft"))
    pairs = [{"prompt": f"does the {a} say yes", "chosen": "yes.", "rejected": "no."} for a in TRAIN * 8]
    held = [{"prompt": f"does the {a} say yes", "chosen": "yes.", "rejected": "no."} for a in HELD_OUT]
    prefs = [f"data.train={write(out / 'prefs.jsonl', pairs)}", f"data.validation={write(out / 'val.jsonl', held)}"]
    dpo = [f"init_from={out / 'sft' / 'checkpoints' / 'best'}", "task=preference", *prefs, "epochs=null"]
    dpo += [
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every=20",
        "optimizer.lr=1e-3",
        "trainer.micro_batch_size=8",
    ]
    summary = finetune.run(check("finetune", FinetuneConfig, [*dpo, *COMMON]), str(out / "dpo"))
    evaluate.run(
        check("evaluate", EvaluateConfig, [f"ckpt={out / 'dpo'}", f"data.test={out / 'val.jsonl'}", "device=cpu"]),
        str(out / "eval"),
    )
    metrics = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    start = next(m for m in metrics if "val_accuracy" in m)
    prompts = [f"does the {a} say yes" for a in HELD_OUT]
    before = answers(str(out / "sft" / "checkpoints" / "best"), prompts)
    after = answers(str(out / "dpo" / "checkpoints" / "latest"), prompts)
    result = {
        "held_out_accuracy_before": start["val_accuracy"],
        "held_out_accuracy_after": summary["final_val_accuracy"],
        "eval": json.loads((out / "eval" / "eval.json").read_text()),
        "yes_share_before": yes_share(before),
        "yes_share_after": yes_share(after),
        f"answers to '{prompts[0]}' before": before[:8],
        f"answers to '{prompts[0]}' after": after[:8],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
