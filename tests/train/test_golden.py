"""Golden losses: a tiny pretraining run and a tiny finetuning run log these exact values (to 1e-4).

A change that still trains, but trains differently (init, data order, loss scaling, schedule), fails here.
Update the values only on purpose, with the reason in the commit message.
"""

import json

import pytest

# step -> loss; the runs are conftest's tiny_runs["lm"] (TINY settings) and the finetune below
PRETRAIN = {1: 3.097918, 2: 2.987230, 3: 2.858371, 4: 2.739608, 5: 2.680348, 6: 2.684664}
PRETRAIN_VAL = {0: 3.102144, 3: 2.748873, 6: 2.644811}
FINETUNE = {1: 0.658752, 2: 0.740385, 3: 0.475142, 4: 0.581040}
FINETUNE_VAL = {0: 0.657113, 2: 0.618982, 4: 0.592004}


def losses(run_dir, key="loss"):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_pretraining_losses_are_golden(tiny_runs):
    assert losses(tiny_runs["lm"]) == pytest.approx(PRETRAIN, abs=1e-4)
    assert losses(tiny_runs["lm"], "val_loss") == pytest.approx(PRETRAIN_VAL, abs=1e-4)


def test_finetuning_losses_are_golden(tiny_runs, tmp_path):
    from lmtrain.cli import check
    from lmtrain.commands import finetune
    from lmtrain.config import FinetuneConfig

    overrides = [f"init_from={tiny_runs['lm']}", f"data.train={tiny_runs['classification']}", "epochs=null"]
    overrides += ["trainer.max_steps=4", "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.eval_every=2"]
    overrides += ["optimizer=adamw", "optimizer.lr=1e-3", "optimizer.weight_decay=0.01", "scheduler=cosine"]
    overrides += ["scheduler.warmup_steps=1", "scheduler.min_lr=0", "dropout=0", "trainer.seed=7"]
    overrides += ["trainer.device=cpu", "trainer.progress_bar=false"]
    finetune.run(check("finetune", FinetuneConfig, overrides), str(tmp_path))
    assert losses(tmp_path) == pytest.approx(FINETUNE, abs=1e-4)
    assert losses(tmp_path, "val_loss") == pytest.approx(FINETUNE_VAL, abs=1e-4)
