"""Hugging Face models in and out, checked against `transformers` itself on tiny random models saved locally."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import lmtrain
from hf_models import build
from safetensors.torch import load_file, save_file

from lmtrain.checkpoint.load import load_model, load_special_tokens
from lmtrain.core.errors import UserError
from lmtrain.data.tokenizer import special_tokens
from lmtrain.hf.save import write_hf
from lmtrain.model.generate import generate
from lmtrain.model.transformer import TransformerConfig, TransformerLM

transformers = pytest.importorskip("transformers")
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
CPU = torch.device("cpu")
TEXT = "the quick brown fox def f(x): return x + 1"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: build(family, root / family) for family in FAMILIES}


def reference(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(folders, family):
    ours, tokenizer = load_model(str(folders[family]), CPU)
    ids = torch.tensor([tokenizer.encode(TEXT).ids, tokenizer.encode(TEXT[::-1]).ids[: len(tokenizer.encode(TEXT))]])
    expected = logits_of(reference(folders[family]), ids)
    assert torch.allclose(logits_of(ours.eval(), ids), expected, atol=1e-5, rtol=0)


def test_architecture_read_from_config(folders):
    llama, _ = load_model(str(folders["llama"]), CPU)
    assert (llama.config.num_kv_heads, llama.config.rope_scaling, llama.config.tie_embeddings) == (2, "llama3", True)
    qwen3, _ = load_model(str(folders["qwen3"]), CPU)
    assert (qwen3.config.head_dim, qwen3.config.qk_norm, qwen3.config.qkv_bias) == (32, True, False)
    qwen2, _ = load_model(str(folders["qwen2"]), CPU)
    assert qwen2.config.qkv_bias and not qwen2.config.bias
    gpt2, _ = load_model(str(folders["gpt2"]), CPU)
    assert (gpt2.config.activation, gpt2.config.position, gpt2.config.bias) == ("gelu_tanh", "learned", True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(folders, family):
    ours, tokenizer = load_model(str(folders[family]), CPU)
    special = load_special_tokens(str(folders[family]), tokenizer)
    prompt = torch.tensor([tokenizer.encode("the quick").ids])
    mine = generate(ours, prompt, 24, temperature=0, stop_tokens=special.stop)[0].tolist()
    theirs = reference(folders[family]).generate(prompt, max_new_tokens=24, do_sample=False)[0].tolist()
    if any(t in special.stop for t in theirs[prompt.shape[1] :]):  # transformers pads after the end token
        end = next(i for i in range(prompt.shape[1], len(theirs)) if theirs[i] in special.stop)
        theirs = theirs[: end + 1]
    assert mine == theirs


def test_special_tokens_from_the_model_files(folders):
    _, tokenizer = load_model(str(folders["llama"]), CPU)
    special = special_tokens(tokenizer, folders["llama"])
    eos, eot = tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")
    assert special.end_of_text == eos and set(special.stop) == {eos, eot}  # several end tokens, as Llama 3
    assert special.bos == tokenizer.token_to_id("<|begin_of_text|>") and special.adds_bos  # BOS in front
    _, qwen_tokenizer = load_model(str(folders["qwen2"]), CPU)
    qwen = special_tokens(qwen_tokenizer, folders["qwen2"])
    assert qwen.end_of_text == qwen_tokenizer.token_to_id("<|im_end|>") and qwen.bos is None and not qwen.adds_bos


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_is_bitwise(folders, family, tmp_path):
    model, tokenizer = load_model(str(folders[family]), CPU)
    special = load_special_tokens(str(folders[family]), tokenizer)
    write_hf(model, tokenizer, special, {}, tmp_path)
    before, after = (
        load_file(str(folders[family] / "model.safetensors")),
        load_file(str(tmp_path / "model.safetensors")),
    )
    before.pop("lm_head.weight", None) if model.config.tie_embeddings else None
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_sharded_weights_import_and_export(tmp_path):
    folder = build("llama", tmp_path / "sharded", shard=True)
    assert (folder / "model.safetensors.index.json").is_file()
    model, tokenizer = load_model(str(folder), CPU)
    ids = torch.tensor([tokenizer.encode(TEXT).ids])
    assert torch.allclose(logits_of(model.eval(), ids), logits_of(reference(folder), ids), atol=1e-5, rtol=0)
    out = tmp_path / "out"
    write_hf(model, tokenizer, load_special_tokens(str(folder), tokenizer), {}, out, max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.allclose(logits_of(reference(out), ids), logits_of(model, ids), atol=1e-5, rtol=0)


def test_index_naming_the_wrong_shard_is_one_line(tmp_path):
    folder = build("llama", tmp_path / "sharded", shard=True)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    index_file.write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"'{folder}' lists weight '{name}' in '{wrong}', which does not hold it"):
        load_model(str(folder), CPU)


@pytest.mark.parametrize(
    "config, family",
    [
        (dict(), "gpt2"),  # learned positions, LayerNorm, no biases: zero biases
        (dict(activation="gelu_tanh", bias=True, tie_embeddings=False), "gpt2"),
        (dict(position="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=1, tie_embeddings=False), "llama"),
        (dict(position="rope", norm="rmsnorm", activation="swiglu", qkv_bias=True), "qwen2"),
        (dict(position="rope", norm="rmsnorm", activation="swiglu", qk_norm=True, head_dim=24), "qwen3"),
    ],
)
def test_lmtrain_model_exports_as_its_family(tmp_path, config, family):
    from lmtrain.data.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=257, d_model=32, num_heads=4, num_layers=2, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    special = special_tokens(tokenizer, tmp_path)  # no side files: lmtrain's own <|endoftext|>
    write_hf(model, tokenizer, special, {}, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    ids = torch.tensor([tokenizer.encode(TEXT).ids])
    assert torch.allclose(logits_of(reference(tmp_path / "out"), ids), logits_of(model, ids), atol=1e-5, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tokenizer(TEXT)["input_ids"] == ids[0].tolist() and hf_tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.parametrize(
    "option, message",
    [
        ({"norm_position": "post"}, "post-norm"),
        ({"activation": "relu2"}, "activation=relu2"),
        ({"activation": "relu2", "position": "rope", "norm": "rmsnorm"}, "activation=relu2"),
        ({"logit_softcap": 30.0}, "logit_softcap"),
    ],
)
def test_a_shape_no_family_expresses_is_one_line(tmp_path, option, message):
    from lmtrain.data.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = TransformerLM(TransformerConfig(vocab_size=257, d_model=32, num_heads=4, num_layers=1, **option))
    with pytest.raises(UserError, match=message):
        write_hf(model, tokenizer, special_tokens(tokenizer, tmp_path), {}, tmp_path / "out")


def _break(folder: Path, how: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if how == "model_type":
        config["model_type"] = "bert"
    elif how == "shape":
        config["intermediate_size"] = 100
    elif how == "option":
        config["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    if how == "missing":
        weights = load_file(str(folder / "model.safetensors"))
        del weights["model.layers.1.mlp.up_proj.weight"]
        save_file(weights, str(folder / "model.safetensors"))
    elif how == "pickle":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif how == "tokenizer":
        (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "how, message",
    [
        ("model_type", "model_type 'bert' is not supported (supported: gpt2, llama, mistral, qwen2, qwen3)"),
        ("shape", "has shape [96, 64], config.json implies [100, 64]"),
        ("option", "hidden_act='gelu' is not supported"),
        ("missing", "missing weight 'model.layers.1.mlp.up_proj.weight'"),
        ("pickle", "only pickle weights (pytorch_model.bin), which lmtrain never loads"),
        ("tokenizer", "has no tokenizer.json"),
    ],
)
def test_broken_folders_are_one_line_errors(folders, tmp_path, how, message):
    folder = tmp_path / "model"
    shutil.copytree(folders["qwen2"], folder)
    _break(folder, how)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_model(str(folder), CPU)


def test_cli_error_for_a_bad_folder_is_one_line(folders, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(folders["gpt2"], folder)
    _break(folder, "model_type")
    result = lmtrain("generate", f"ckpt={folder}", "prompt=x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lmtrain generate: error: ckpt: {folder / 'config.json'}: model_type 'bert' is not supported "
        "(supported: gpt2, llama, mistral, qwen2, qwen3)"
    ]


def test_generate_honours_generation_config(folders, tmp_path):
    from lmtrain.commands.generate import sampling
    from lmtrain.config import GenerateConfig

    folder = tmp_path / "model"
    shutil.copytree(folders["qwen3"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    _, tokenizer = load_model(str(folder), CPU)
    special = load_special_tokens(str(folder), tokenizer)
    assert sampling(GenerateConfig(ckpt=str(folder)), special, 96) == {
        "max_new_tokens": 200,
        "temperature": 0.6,
        "top_k": 50,
        "top_p": 0.9,
    }
    assert sampling(GenerateConfig(ckpt=str(folder), temperature=0.0, top_p=1.0), special, 96)["temperature"] == 0.0
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": [1, 2]}))
    greedy = load_special_tokens(str(folder), tokenizer)
    assert sampling(GenerateConfig(ckpt=str(folder)), greedy, 96)["temperature"] == 0.0
    assert {1, 2} <= set(greedy.stop)


def test_cli_generate_prints_what_transformers_generates(folders):
    folder = folders["gpt2"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("the quick", return_tensors="pt")["input_ids"]
    out = reference(folder).generate(prompt, max_new_tokens=12, do_sample=False)[0]
    expected = tokenizer.decode(out, skip_special_tokens=True)
    result = lmtrain("generate", f"ckpt={folder}", "prompt=the quick", "max_new_tokens=12", "temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_from_hf_then_export_loads_in_transformers(folders, tmp_path, family):
    """A short finetune, then `export format=hf`: transformers loads the result and its logits equal lmtrain's
    on the finetuned checkpoint. GPT-2 goes through the real CLI; the others run the same commands in-process."""
    from lmtrain.cli import check
    from lmtrain.commands import export, finetune
    from lmtrain.config import ExportConfig, FinetuneConfig

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) + "\n" for i in range(24)))
    run = tmp_path / "run"
    overrides = [
        f"init_from={folders[family]}",
        "task=lm",
        f"data.train={train}",
        "epochs=null",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.micro_batch_size=4",
        "scheduler.warmup_steps=1",
        "optimizer.lr=1e-2",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
    ]
    ckpt, out = run / "checkpoints" / "latest", tmp_path / "hf"
    if family == "gpt2":
        result = lmtrain("finetune", *overrides, f"hydra.run.dir={run}")
        assert result.returncode == 0, result.stderr
        result = lmtrain("export", f"ckpt={ckpt}", "format=hf", f"out={out}", "device=cpu")
        assert result.returncode == 0, result.stderr
    else:
        finetune.run(check("finetune", FinetuneConfig, overrides), str(run))
        export.run(ExportConfig(ckpt=str(ckpt), format="hf", out=str(out), device="cpu"), str(tmp_path))
    assert (ckpt / "generation_config.json").is_file()  # the model's end tokens travel with it
    finetuned, tokenizer = load_model(str(ckpt), CPU)
    ids = torch.tensor([tokenizer.encode(TEXT).ids])
    exported = logits_of(reference(out), ids)
    assert torch.allclose(exported, logits_of(finetuned.eval(), ids), atol=1e-5, rtol=0)
    assert not torch.allclose(exported, logits_of(reference(folders[family]), ids), atol=1e-3)  # it did train


def test_evaluate_an_hf_model_gives_transformers_loss(folders, tmp_path):
    from lmtrain.commands import evaluate
    from lmtrain.config import EvalDataConfig, EvaluateConfig

    folder = folders["mistral"]
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    cfg = EvaluateConfig(ckpt=str(folder), data=EvalDataConfig(test=str(tmp_path / "test.jsonl")), device="cpu")
    evaluate.run(cfg, str(tmp_path))
    report = json.loads((tmp_path / "eval.json").read_text())
    _, tokenizer = load_model(str(folder), CPU)
    # as transformers frames the text: Mistral's tokenizer puts its BOS first
    ids = torch.tensor([tokenizer.encode(TEXT).ids + [tokenizer.token_to_id("</s>")]])
    assert ids[0, 0].item() == tokenizer.token_to_id("<s>")
    with torch.no_grad():
        expected = reference(folder)(ids, labels=ids).loss.item()
    assert report["loss"] == pytest.approx(expected, abs=1e-5)


def test_continued_pretraining_from_an_hf_model(folders, tmp_path):
    from conftest import compose

    from lmtrain.commands import pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    cfg = compose(
        f"init_from={folders['llama']}",
        f"data.train={corpus}",
        "data.seq_len=32",
        "trainer.max_steps=8",
        "trainer.eval_every=8",
        "trainer.eval_batches=2",
        "trainer.micro_batch_size=4",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "scheduler.warmup_steps=1",
        "optimizer.lr=3e-3",
    )
    summary = pretrain.run(cfg, str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "latest"
    model, tokenizer = load_model(str(ckpt), CPU)
    assert model.config.num_kv_heads == 2 and tokenizer.to_str() == load_model(str(folders["llama"]), CPU)[1].to_str()
    assert load_special_tokens(str(ckpt), tokenizer).stop == load_special_tokens(str(folders["llama"]), tokenizer).stop
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert summary["steps"] == 8 and losses[-1] < losses[0]


def test_a_sliding_window_caps_the_context_where_full_attention_is_exact(tmp_path, caplog):
    folder = build("mistral", tmp_path / "mistral", sliding_window=48)
    model, _ = load_model(str(folder), CPU)
    assert model.config.max_seq_len == 48
    assert "sliding_window=48 is shorter than max_position_embeddings=96" in caplog.text
