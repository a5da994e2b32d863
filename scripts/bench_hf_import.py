"""Load time and peak memory of importing a Hugging Face model, against the size of its weights.

Builds a random Llama of about 0.5B parameters with `transformers` (once, cached in --dir), then loads it with
lmtrain in a fresh process and prints the load time and the peak resident memory the load added:

    .venv/bin/python scripts/bench_hf_import.py [--dir /tmp/lmtrain-bench-llama] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MEASURE = """
import json, resource, sys, time, torch
from lmtrain.checkpoint.load import load_model
def rss_mb():  # current resident set
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6
base = rss_mb()
start = time.perf_counter()
model, tokenizer = load_model(sys.argv[1], torch.device("cpu"))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB -> MB
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": seconds, "base_mb": base, "peak_mb": peak, "after_mb": rss_mb(), "params": params}))
"""


def build(folder: Path, layers: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4608,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(31999)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/lmtrain-bench-llama")
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        print(f"building a random Llama in {folder} ...", flush=True)
        build(folder, args.layers)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    added = result["peak_mb"] - result["base_mb"]
    print(f"parameters      {result['params'] / 1e9:.3f} B")
    print(f"weights on disk {weights:,.0f} MB (fp32)")
    print(f"load time       {result['seconds']:.1f} s")
    print(f"peak memory     +{added:,.0f} MB over the process before loading ({added / weights:.2f}x the weights)")
    print(f"after loading   +{result['after_mb'] - result['base_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
