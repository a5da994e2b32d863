"""Peak memory of a LoRA finetune against a full finetune of the same model, a few AdamW steps each on CPU, each
in a fresh process (peak resident memory added by building the model and training).

    .venv/bin/python scripts/bench_lora_memory.py [--d-model 1024] [--layers 12] [--steps 3] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MEASURE = """
import json, resource, sys, time, torch
from lmtrain.model.lora import add_lora
from lmtrain.train.losses import cross_entropy
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train.optim import parameter_groups
mode, d_model, layers, steps, rank = sys.argv[1], *map(int, sys.argv[2:])
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6
base = rss_mb()
torch.manual_seed(0)
config = TransformerConfig(vocab_size=32000, d_model=d_model, num_heads=d_model // 64, num_kv_heads=d_model // 256,
                           num_layers=layers, max_seq_len=256, position="rope", norm="rmsnorm", activation="swiglu",
                           tie_embeddings=False)
model = TransformerLM(config)
if mode == "lora":
    add_lora(model, ["all_linear"], rank=rank, alpha=2.0 * rank, dropout=0.0)
optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=1e-4)
tokens = torch.randint(0, 32000, (4, 257))
start = time.perf_counter()
for _ in range(steps):
    total, count = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    (total / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
seconds = (time.perf_counter() - start) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(json.dumps({"peak_mb": peak - base, "params": sum(p.numel() for p in model.parameters()),
                  "trainable": trainable, "step_s": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    results = {}
    for mode in ("full", "lora"):
        argv = [mode, str(args.d_model), str(args.layers), str(args.steps), str(args.rank)]
        out = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    params = results["full"]["params"]
    print(f"model: {params / 1e6:.1f}M parameters (d_model {args.d_model}, {args.layers} layers), batch 4 x 256")
    for mode, r in results.items():
        print(
            f"  {mode:<5} trainable {r['trainable'] / 1e6:8.2f}M  peak +{r['peak_mb']:8,.0f} MB  "
            f"{r['step_s']:.2f} s/step"
        )
    print(f"  LoRA / full peak memory: {results['lora']['peak_mb'] / results['full']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
