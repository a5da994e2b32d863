"""Tokens/s and peak memory of a LoRA DPO training step, lmtrain against TRL's DPOTrainer: the same random Llama
(built with transformers), the same token batch (B pairs of prompt + answers), the same LoRA (rank 16, every
linear layer), AdamW, torch threads and fp32 on CPU; the reference is the model with its adapters off in both.
Each library runs in a fresh process; peak memory is the growth of its peak resident memory over the run.

    .venv/bin/python scripts/bench_preference.py [--hidden 512] [--layers 8] [--pairs 4] [--len 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = """
import json, resource, sys, time, torch
torch.manual_seed(0)
folder, pairs, length, steps, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6
g = torch.Generator().manual_seed(1)
prompt = length // 4
rows = [{"prompt_ids": torch.randint(3, 290, (prompt,), generator=g).tolist(),
         "chosen_ids": torch.randint(3, 290, (length - prompt,), generator=g).tolist(),
         "rejected_ids": torch.randint(3, 290, (length - prompt,), generator=g).tolist()} for _ in range(pairs)]
base = rss_mb()
"""

LMTRAIN = """
from lmtrain.checkpoint.load import load_model
from lmtrain.model.lora import add_lora
from lmtrain.train import preference
from lmtrain.train.optim import parameter_groups
from lmtrain.train.trainer import Trainer
model = load_model(folder, torch.device("cpu"), key="init_from")[0]
add_lora(model, ["all_linear"], rank=16, alpha=32.0, dropout=0.0)
optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-5)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
reference = preference.Reference(adapters=True)
objective = preference.PreferenceObjective(
    preference.PreferenceLoss.dpo, preference.Settings(beta=0.1), reference, torch.device("cpu"))
trainer = Trainer(model, optimizer, schedule, None, device=torch.device("cpu"), grad_clip=1.0, objective=objective)
ids = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
tokens = torch.tensor(ids)
targets = tokens[:, 1:].clone()
targets[:, : prompt - 1] = -100
batch = (tokens[:, :-1], {"targets": targets, "pairs": torch.arange(pairs), "key": "train", "ignore_index": -100})
def step():
    trainer.train_step([batch])
"""

TRL = """
import datasets, transformers, trl
from peft import LoraConfig
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
tokenizer.pad_token = tokenizer.eos_token
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
args = trl.DPOConfig(output_dir=folder + "/trl", report_to="none", use_cpu=True, bf16=False, learning_rate=1e-5,
                     max_grad_norm=1.0, per_device_train_batch_size=pairs, max_length=None, disable_dropout=True)
data = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * pairs)
trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
trainer.create_optimizer_and_scheduler(num_training_steps=steps + 1)
batch = trainer.data_collator(rows)
def step():
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.requires_grad], 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
"""

MEASURE = """
step()  # warm-up
start = time.perf_counter()
for _ in range(steps):
    step()
seconds = (time.perf_counter() - start) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
print(json.dumps({"tokens_per_s": 2 * pairs * length / seconds, "step_s": seconds, "peak_mb": peak - base}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from hf_models import build  # a random Llama and its tokenizer, saved with transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = build(
            "llama",
            Path(tmp) / "llama",
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256),
            num_hidden_layers=args.layers,
            max_position_embeddings=2 * args.len,
        )
        argv = [str(folder), str(args.pairs), str(args.len), str(args.steps), str(args.threads)]
        results = {}
        for name, code in (("lmtrain", LMTRAIN), ("trl", TRL)):
            run = subprocess.run(
                [sys.executable, "-c", COMMON + code + MEASURE, *argv], capture_output=True, text=True, check=False
            )
            if run.returncode != 0:
                raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print(
        f"LoRA DPO step: Llama {args.hidden} wide x {args.layers} layers, {args.pairs} pairs x {args.len} tokens, "
        f"{args.threads} threads, fp32 CPU"
    )
    for name, r in results.items():
        print(
            f"  {name:8s} {r['tokens_per_s']:10,.0f} tokens/s  {r['step_s']:7.3f} s/step  {r['peak_mb']:8.1f} MB peak"
        )
    print(f"  lmtrain / trl: {results['lmtrain']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
