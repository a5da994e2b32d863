#!/usr/bin/env bash
# A prepared GPU check: model=gpt2_124m with bf16, torch.compile, fused AdamW and flash attention (SDPA) for a
# few hundred steps on prepared data, then DDP and FSDP over all GPUs when there are several. Prints tokens/s,
# MFU, peak memory and the first and last loss of each run; ~6 minutes in all on one H100-class GPU.
#
#   make gpu-wheels              # here, with a package index: hydra-core, omegaconf, antlr4 wheels into .wheels/
#   scripts/gpu_check.sh         # there, from the repository root (or: make gpu-check)
#   scripts/gpu_check.sh --dry-run   # on CPU: tiny model, fp32, a few steps (tests/test_gpu_check.py runs it)
#
# The machine's own torch, tokenizers and safetensors are used; what is missing of Hydra is installed from
# .wheels/ without a package index, and lmtrain runs from this tree (no pip install of lmtrain itself).
set -euo pipefail

PYTHON=${PYTHON:-python3}
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
ROOT=$(pwd)
WORK=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"

if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --find-links "$ROOT/.wheels" hydra-core omegaconf
fi
# lmtrain importable from this tree, its configs as the package lmtrain.configs (as the wheel lays them out)
mkdir -p "$WORK/site/lmtrain"
for entry in "$ROOT"/lmtrain/*; do ln -sfn "$entry" "$WORK/site/lmtrain/"; done
ln -sfn "$ROOT/configs" "$WORK/site/lmtrain/configs"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export LMTRAIN_CACHE="$WORK/cache"

if [[ $DRY_RUN == 1 ]]; then
  NGPU=0
  COMMON=(model=tiny model.max_seq_len=32 trainer.device=cpu trainer.precision=fp32 trainer.compile=false
          trainer.micro_batch_size=4 trainer.max_steps=4 trainer.log_every=1 trainer.eval_every=4
          trainer.eval_batches=1 trainer.checkpoint_every=4 trainer.progress_bar=false scheduler.warmup_steps=1
          data.tokenizer=char data.max_chars=200000)
else
  NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  [[ $NGPU -ge 1 ]] || { echo "gpu_check: no CUDA device (use --dry-run on CPU)" >&2; exit 2; }
  COMMON=(model=gpt2_124m trainer=gpu trainer.max_steps=300 trainer.micro_batch_size=16 trainer.log_every=25
          trainer.eval_every=300 trainer.eval_batches=4 trainer.checkpoint_every=300 trainer.progress_bar=false
          scheduler.warmup_steps=30 data.tokenizer=bpe data.vocab_size=8192 data.tokenizer_sample_chars=10000000)
fi

started=$(date +%s)
echo "== prepare (python-stdlib corpus)"
"$PYTHON" -m lmtrain prepare "${COMMON[@]}" 2>&1 | tail -n 3

run() {  # run <name> [overrides...]: one pretraining run, then its figures
  local name=$1
  shift
  echo "== $name"
  "$PYTHON" -m lmtrain pretrain "${COMMON[@]}" "$@" "hydra.run.dir=$WORK/$name" > "$WORK/$name.log" 2>&1 \
    || { tail -n 20 "$WORK/$name.log"; echo "gpu_check: $name failed" >&2; exit 1; }
  "$PYTHON" - "$WORK/$name" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in records if "loss" in r]
result = json.loads((run / "result.json").read_text())
mfu = result.get("mfu")
memory = result.get("peak_memory_gb")
print(
    f"tokens/s {result['tokens_per_s']:,.0f}  MFU {mfu:.1%}" if mfu is not None else f"tokens/s {result['tokens_per_s']:,.0f}  MFU -",
    f" peak memory {memory:.1f} GB" if memory is not None else " peak memory -",
    f" loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {train[-1]['step']})",
    f" val_loss {result['final_val_loss']:.3f}",
    sep="",
)
EOF
}

run single
if [[ $NGPU -gt 1 ]]; then
  run ddp "trainer.nproc=$NGPU" trainer.strategy=ddp
  run fsdp "trainer.nproc=$NGPU" trainer.strategy=fsdp
fi
echo "gpu_check: done in $(($(date +%s) - started)) s (work in $WORK)"
