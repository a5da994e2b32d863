"""LoRA adapters: the layer, merging, adapter checkpoints on an open model, PEFT export checked with `peft`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import build
from safetensors.torch import load_file, save_file

from lmtrain.checkpoint.load import load_model
from lmtrain.cli import check
from lmtrain.commands import export, finetune
from lmtrain.config import ExportConfig, FinetuneConfig
from lmtrain.core.errors import UserError
from lmtrain.model.lora import LoRALinear, add_lora, merge_lora
from lmtrain.model.transformer import TransformerConfig, TransformerLM

CPU = torch.device("cpu")
TEXT = "the quick brown fox def f(x): return x + 1"


def test_lora_layer_starts_as_its_base_and_merges_exactly():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2)).eval()
    tokens = torch.randint(0, 50, (2, 9))
    before = model(tokens)
    wrapped = add_lora(model, ["attention", "up"], rank=4, alpha=8.0, dropout=0.0)
    assert wrapped == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "ffn.up")]
    assert torch.equal(model(tokens), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{m}" for w in wrapped for m in "AB"}
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B)
    adapted = model(tokens)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(tokens), adapted, atol=1e-5)


def lora_lm_run(base, train, run_dir, steps: int, *extra: str) -> dict:
    """A short LoRA finetune (task=lm) of `base` on `train`, in-process; returns its summary."""
    overrides = [
        f"init_from={base}",
        "task=lm",
        f"data.train={train}",
        "adapter=lora",
        "epochs=null",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.micro_batch_size=4",
        "scheduler.warmup_steps=1",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        *extra,
    ]
    return finetune.run(check("finetune", FinetuneConfig, overrides), str(run_dir))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A LoRA finetune of a tiny random Qwen2 (Hugging Face folder): its checkpoint and base."""
    root = tmp_path_factory.mktemp("lora")
    base = build("qwen2", root / "qwen2")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) + "\n" for i in range(24)))
    lora_lm_run(base, train, root / "run", 3, "adapter.rank=4", "optimizer.lr=3e-2")
    return root / "run" / "checkpoints" / "latest", base


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_merged_export_equals_the_adapter_model(adapter_run, tmp_path):
    ckpt, base = adapter_run
    model, tokenizer = load_model(str(ckpt), CPU)
    tokens = torch.tensor([tokenizer.encode(TEXT).ids])
    base_model, _ = load_model(str(base), CPU)
    assert not torch.allclose(logits(model.eval(), tokens), logits(base_model.eval(), tokens), atol=1e-4)
    export.run(ExportConfig(ckpt=str(ckpt), merge_adapter=True, out=str(tmp_path / "merged"), device="cpu"), ".")
    merged, _ = load_model(str(tmp_path / "merged"), CPU)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert torch.allclose(logits(merged.eval(), tokens), logits(model, tokens), atol=1e-5, rtol=0)


def test_peft_export_loads_with_peft_onto_the_transformers_model(adapter_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ckpt, base = adapter_run
    export.run(ExportConfig(ckpt=str(ckpt), format="hf", out=str(tmp_path / "adapter"), device="cpu"), ".")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    reference = transformers.AutoModelForCausalLM.from_pretrained(base)
    adapted = peft.PeftModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    model, tokenizer = load_model(str(ckpt), CPU)
    tokens = torch.tensor([tokenizer.encode(TEXT).ids])
    assert torch.allclose(logits(adapted, tokens), logits(model.eval(), tokens), atol=1e-5, rtol=0)


def test_an_adapter_refuses_a_changed_base(adapter_run, tmp_path):
    ckpt, base = adapter_run
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    changed = tmp_path / "base"
    shutil.copytree(base, changed)
    record = json.loads((moved / "adapter.json").read_text())
    (moved / "adapter.json").write_text(json.dumps({**record, "base": str(changed)}))
    load_model(str(moved), CPU)  # an identical copy of the base is the same base
    weights = load_file(str(changed / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="changed since the adapter"):
        load_model(str(moved), CPU)


def test_an_adapter_exports_merged_or_as_peft_only(adapter_run, tmp_path):
    ckpt, _ = adapter_run
    with pytest.raises(UserError, match="merge_adapter=true"):
        export.run(ExportConfig(ckpt=str(ckpt), out=str(tmp_path / "x"), device="cpu"), ".")


def test_lora_student_distils_from_a_teacher(adapter_run, tmp_path):
    ckpt, base = adapter_run
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the lazy dog {i} sleeps"}) + "\n" for i in range(16)))
    # the adapter checkpoint itself teaches: a teacher can be an adapter run too
    summary = lora_lm_run(base, train, tmp_path / "run", 2, "loss=distill", f"loss.teacher={ckpt}")
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "latest" / "model.safetensors"))
    assert summary["steps"] == 2 and saved and all(".lora_" in k for k in saved)
