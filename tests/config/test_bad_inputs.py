"""Bad inputs through the real CLI: each exits non-zero with one line on stderr naming the culprit, no
traceback, and leaves the files of existing runs as they were."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import lmtrain_many, write_jsonl

CLF = "{classifier}/checkpoints/latest"
FT = ["finetune", "init_from={lm}", "trainer.device=cpu", "trainer.progress_bar=false", "hydra.run.dir={fresh}"]

# (command line with {placeholders}, text the one stderr line must hold)
CASES = [
    # config values and keys
    (["pretrain", "model.d_modle=512"], "unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["pretrain", "model=tiyn"], "model=tiyn: no such option"),
    (["pretrain", "trainer.max_steps=abc"], "trainer.max_steps"),
    (["pretrain", "trainer.max_steps={{a: 1}}"], "trainer.max_steps"),
    (["pretrain", "optimizer.lr=-1"], "optimizer.lr: must be > 0"),
    (["pretrain", "optimizer=muon", "optimizer.muon_adjust_lr_fn=rms"], "optimizer.muon_adjust_lr_fn: 'rms' is not"),
    (["pretrain", "optimizer=muon", "optimizer.muon_dtype=fp16"], "optimizer.muon_dtype: 'fp16' is not one of"),
    (["pretrain", "trainer.ema_decay=1.5"], "trainer.ema_decay: must be in (0, 1) or null"),
    (["pretrain", "optimizer=muon", "trainer.strategy=fsdp"], "optimizer=muon: not supported with trainer.strategy"),
    (["pretrain", "model.logit_softcap=0"], "model.logit_softcap: must be > 0 or null"),
    (["pretrain", "trainer.max_steps=5", "scheduler.warmup_steps=10"], "scheduler.warmup_steps: 10 exceeds"),
    (["pretrain", "data=mixture", "data.sources=[]"], "data.sources: data=mixture needs at least one source"),
    (["pretrain", "data=mixture", "data.sources=[{{path: a, weight: 0}}]"], "data.sources[0].weight: must be > 0"),
    (["pretrain", "data.on_bad_record=drop"], "data.on_bad_record: 'drop' is not one of skip, error"),
    (["pretrain", "-m", "model=glob(zzz*)"], "model: glob(zzz*) matches none"),
    (["pretrain", "-m", "optimizer.lr=interval(1e-4,1e-2)"], "optimizer.lr: interval(...)"),
    (["pretrain", "-m", "trainer.nproc=1,2"], "trainer.nproc: a -m sweep"),
    (["finetune", "init_from={lm}", "data.train={clf_data}", "epochs={{}}"], "epochs: expected a single value"),
    (["finetune", "data.train={clf_data}"], "init_from: missing"),
    (["predict", f"ckpt={CLF}", "batch_size=[1,2]"], "batch_size: expected a single value, got a list"),
    (["predict", f"ckpt={CLF}"], "text / input: give exactly one"),
    (["generate", "ckpt={lm}", "max_new_tokens={{a: 1}}"], "max_new_tokens: expected a single value, got a dict"),
    (["generate", "ckpt={lm}", "top_p=1.5"], "top_p: must be in (0, 1]"),
    (["generate", "ckpt={lm}", "temperature=-1"], "temperature: must be >= 0"),
    (["evaluate", "ckpt={lm}", "split=dev"], "split: 'dev' is not one of"),
    (["export", "ckpt={lm}", "dtype=int4"], "dtype: 'int4' is not one of"),
    # paths
    (["pretrain", "data.train={root}/missing.txt"], "data.train: no such file or folder"),
    (["pretrain", "data.train={root}/mycorpus"], "data.train: '{root}/mycorpus' is not a"),
    (["pretrain", "data.train={root}/empty_folder"], "data.train: folder '{root}/empty_folder' holds no"),
    (["pretrain", "data.train={corpus}", "hydra.run.dir={root}/mycorpus"], "hydra.run.dir: '{root}/mycorpus' is a"),
    (["pretrain", "data.train={corpus}", "data.cache_dir={root}/mycorpus/cache"], "data.cache_dir: cannot create"),
    (["generate", "ckpt={lm}", "prompt_file={root}/binary.txt"], "prompt_file: '{root}/binary.txt' is not UTF-8"),
    (["generate", "ckpt={lm}", "prompt_file={root}/empty_folder"], "prompt_file: '{root}/empty_folder' is a folder"),
    (["generate", "ckpt={lm}", "prompt_file={root}/missing.txt"], "prompt_file: no such file"),
    (["generate", "ckpt={root}/missing"], "ckpt: no such checkpoint or run folder"),
    (["generate", "ckpt={root}/mycorpus"], "ckpt: '{root}/mycorpus' is a file"),
    (["predict", f"ckpt={CLF}", "text=x", "output={root}/empty_folder"], "output: '{root}/empty_folder' is a folder"),
    (["predict", f"ckpt={CLF}", "text=x", "output={root}/mycorpus/p.jsonl"], "output: cannot create"),
    (["predict", f"ckpt={CLF}", "input={root}/missing.jsonl"], "input: no such file or folder"),
    (["export", "ckpt={lm}", "out={root}/mycorpus"], "out: '{root}/mycorpus' is a file"),
    (["evaluate", "ckpt={lm}", "data.test={root}/data.xyz"], "data.test: '{root}/data.xyz' is not a"),
    ([*FT, "data.train={clf_data}", "data.validation={root}/mixed"], "data.validation: folder '{root}/mixed' mixes"),
    ([*FT, "data.train={clf_data}", "loss=distill", "loss.teacher={root}/missing"], "loss.teacher: no such"),
    # records
    ([*FT, "data.train={root}/null_text.jsonl", "data.on_bad_record=error"], "line 2: field 'text' is null"),
    ([*FT, "data.train={root}/mixed_labels.jsonl"], "label 'positive' (record 3 of data.train) is a str"),
    ([*FT, "data.train={clf_data}", "data.validation={root}/unseen_label.jsonl"], "label 7 in data.validation"),
    ([*FT, "task=lm", "data.train={root}/empty_texts.jsonl"], "data.train: '{root}/empty_texts.jsonl': no tokens to"),
    (
        [*FT, "task=preference", "data.train={root}/same_pairs.jsonl"],
        "same_pairs.jsonl': no usable preference pair (all 3 skipped: 3 identical chosen and rejected)",
    ),
    ([*FT, "data.train={root}/body.jsonl"], "has no field 'text'"),
    ([*FT, "data.train={root}/broken.jsonl"], "data.train: '{root}/broken.jsonl' line 3: not JSON"),
    (["pretrain", "data.train={root}/broken.jsonl", "hydra.run.dir={fresh}"], "broken.jsonl' line 3: not JSON"),
    (["evaluate", "ckpt={lm}", "data.test={root}/empty_texts.jsonl", "hydra.run.dir={fresh}"], "jsonl': no tokens to"),
    (["predict", f"ckpt={CLF}", "input={root}/null_text.jsonl", "on_bad_record=error"], "line 2: field 'text' is"),
    (["pretrain", "data.train={root}/int_text.jsonl", "data.on_bad_record=error", "hydra.run.dir={fresh}"], "line 2"),
    # checkpoints
    ([*FT, "data.train={clf_data}", "freeze_blocks=10"], "freeze_blocks: 10 exceeds the 2 blocks"),
    (["generate", "ckpt={root}/empty_folder"], "ckpt: no complete checkpoint at"),
    (["generate", "ckpt={root}/torn"], "model.safetensors' is damaged"),
    (["predict", "ckpt={lm}", "text=x"], "ckpt: predict needs a checkpoint finetuned with task=classification"),
    (["generate", f"ckpt={CLF}"], "ckpt: a classification checkpoint does not generate text"),
    (
        ["pretrain", "data.train={corpus}", "optimizer=sgd", "trainer.resume={root}/lm_copy", "hydra.run.dir={fresh}"],
        "trainer.resume: '{root}/lm_copy/checkpoints/step_0000006' was trained with optimizer=adamw",
    ),
]
PRETRAIN = ["model=tiny", "model.max_seq_len=32", "data.tokenizer=char", "trainer.device=cpu"]
PRETRAIN += ["trainer.micro_batch_size=4", "trainer.max_steps=6", "trainer.progress_bar=false"]


def snapshot(*roots: Path) -> dict[str, tuple]:
    return {
        str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sandbox(tiny_runs, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "mycorpus").write_text("a local file without a suffix\n")
    (root / "empty_folder").mkdir()
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "data.xyz").write_text("x\n")
    (root / "mixed").mkdir()
    (root / "mixed" / "a.txt").write_text("a\n")
    write_jsonl(root / "mixed" / "b.jsonl", [{"text": "b"}])
    good = [{"text": "the red cat", "label": 1}, {"text": "a dog", "label": 0}] * 5
    write_jsonl(root / "null_text.jsonl", [good[0], {"text": None, "label": 0}, *good])
    write_jsonl(root / "mixed_labels.jsonl", [good[0], good[1], {"text": "x", "label": "positive"}, *good])
    write_jsonl(root / "unseen_label.jsonl", [good[0], {"text": "a cat", "label": 7}])
    write_jsonl(root / "empty_texts.jsonl", [{"text": ""}] * 3)
    write_jsonl(root / "same_pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3)
    write_jsonl(root / "body.jsonl", [{"body": "x", "label": 1}] * 3)
    write_jsonl(root / "broken.jsonl", [good[0], good[1]])
    with open(root / "broken.jsonl", "a") as f:
        f.write('{"text": "a cut-off line\n' + json.dumps(good[0]) + "\n")
    write_jsonl(root / "int_text.jsonl", [{"text": "the cat sat " * 20}, {"text": 5}] * 20)
    torn = root / "torn"
    shutil.copytree(tiny_runs["lm"] / "checkpoints" / "latest", torn)
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:100])
    shutil.copytree(tiny_runs["lm"], root / "lm_copy", symlinks=True)
    return root


def test_bad_inputs_fail_with_one_line(tiny_runs, corpus, sandbox, tmp_path):
    assert len(CASES) >= 40
    places = {
        "lm": tiny_runs["lm"],
        "classifier": tiny_runs["classifier"],
        "clf_data": tiny_runs["classification"],
        "root": sandbox,
        "corpus": corpus,
    }
    lines = []
    for i, (args, expected) in enumerate(CASES):
        fill = {**places, "fresh": tmp_path / f"run{i}"}
        extra = PRETRAIN if args[0] == "pretrain" else []
        flags = [a for a in args[1:] if a.startswith("-")]  # Hydra takes its flags before the overrides
        overrides = [a.format(**fill) for a in args[1:] if not a.startswith("-")]
        lines.append(([args[0], *flags, *extra, *overrides], expected.format(**fill)))
    before = snapshot(tiny_runs["lm"], tiny_runs["classifier"])
    results = lmtrain_many([argv for argv, _ in lines], cwd=tmp_path)
    assert snapshot(tiny_runs["lm"], tiny_runs["classifier"]) == before
    failures = []
    for (argv, expected), result in zip(lines, results, strict=True):
        stderr = [line for line in result["stderr"].splitlines() if line.strip()]
        good = (
            result["rc"] != 0
            and "Traceback" not in result["stderr"]
            and len(stderr) == 1
            and stderr[0].startswith(f"lmtrain {argv[0]}: error: ")
            and expected in stderr[0]
        )
        if not good:
            failures.append(f"{' '.join(argv)}\n  rc {result['rc']}, want {expected!r}, stderr:\n{result['stderr']}")
    assert not failures, "\n".join(failures)
