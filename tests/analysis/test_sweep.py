"""Sweeps through Hydra multirun, result.json, `lmtrain report` and its plots, TensorBoard."""

import json

import pytest
from conftest import TINY, compose, lmtrain

from lmtrain.commands import pretrain, report


def sweep(tmp_path, corpus, *overrides):
    sweep_dir = tmp_path / "sweep"
    result = lmtrain("pretrain", "-m", *TINY, f"data.train={corpus}", *overrides, f"hydra.sweep.dir={sweep_dir}")
    return result, sweep_dir


def results(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")}


def test_two_by_two_sweep_and_its_report(tmp_path, corpus):
    result, sweep_dir = sweep(tmp_path, corpus, "optimizer.lr=1e-3,3e-3", "scheduler=cosine,wsd")
    assert result.returncode == 0, result.stderr
    found = results(sweep_dir)
    assert sorted(found) == ["0", "1", "2", "3"]
    for job, r in found.items():
        assert r["status"] == "completed"
        assert {
            "best_val_loss",
            "final_val_loss",
            "steps",
            "tokens",
            "wall_seconds",
            "tokens_per_s",
            "mfu",
            "checkpoint",
        } <= set(r)
        assert r["steps"] == 6 and r["objective"] == r["best_val_loss"]
        assert (sweep_dir / job / ".hydra" / "overrides.yaml").is_file()
    assert "4 of 4 jobs completed" in result.stderr

    runs = report.sort_runs(report.find_runs([str(sweep_dir)]))
    header, table = report.rows(runs)
    assert header[1:3] == ["optimizer.lr", "scheduler"]  # exactly the swept keys
    assert header[3] == "best val_loss"
    best = [row[3] for row in table]
    assert best == sorted(best)
    assert {(row[1], row[2]) for row in table} == {(lr, s) for lr in ("0.001", "0.003") for s in ("cosine", "wsd")}

    out = lmtrain("report", str(sweep_dir), "--format", "json")
    assert out.returncode == 0, out.stderr
    assert [row["run"] for row in json.loads(out.stdout[: out.stdout.rindex("]") + 1])] == [r[0] for r in table]
    for name in ("report_loss_vs_step.png", "report_loss_vs_tokens.png", "report_lr.png"):
        assert (sweep_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(sweep_dir.glob("report_metric_vs_*.png"))  # two swept keys: no one-parameter plot


def test_failed_job_does_not_end_the_sweep(tmp_path, corpus):
    result, sweep_dir = sweep(tmp_path, corpus, "model.num_heads=2,3,4")
    assert result.returncode == 1
    found = results(sweep_dir)
    assert [found[j]["status"] for j in ("0", "1", "2")] == ["completed", "failed", "completed"]
    assert found["1"]["error"] == "model.num_heads: 3 does not divide model.d_model=64 (or set model.head_dim)"
    assert "sweep: job 1 failed: model.num_heads: 3 does not divide" in result.stderr
    runs = report.sort_runs(report.find_runs([str(sweep_dir)]))
    assert [r.name for r in runs][-1] == "1"
    header, table = report.rows(runs)
    assert table[-1][-1].startswith("failed: model.num_heads")


def test_report_on_a_single_run_and_plots(tmp_path, corpus):
    for lr in ("1e-3", "3e-3", "1e-2"):
        run_dir = tmp_path / f"lr{lr}"
        summary = pretrain.run(compose(*TINY, f"data.train={corpus}", f"optimizer.lr={lr}"), str(run_dir))
        from lmtrain.train.sweep import write_result

        write_result(run_dir, "completed", summary, [f"optimizer.lr={lr}"])

    single = report.find_runs([str(tmp_path / "lr1e-3")])
    header, table = report.rows(single)
    assert header[:2] == ["run", "optimizer.lr"] and len(table) == 1
    assert lmtrain("report", str(tmp_path / "lr1e-3"), "--no-plots").returncode == 0

    from lmtrain.analysis import plots

    runs = report.sort_runs(report.find_runs([str(tmp_path / d) for d in ("lr1e-3", "lr3e-3", "lr1e-2")]))
    figures = plots.figures(runs, ["optimizer.lr"])
    assert len(figures["report_loss_vs_step.png"].axes[0].get_lines()) == 2 * 3  # train + val per run
    assert len(figures["report_lr.png"].axes[0].get_lines()) == 3
    param = figures["report_metric_vs_optimizer.lr.png"].axes[0]
    assert len(param.get_lines()) == 1 and len(param.get_lines()[0].get_xdata()) == 3
    written = plots.write_plots(runs, ["optimizer.lr"], tmp_path / "plots")
    from PIL import Image

    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300

    result_file = tmp_path / "lr1e-2" / "result.json"
    result_file.write_text(result_file.read_text()[:40])  # cut off mid-write: the run is read from its metrics
    (damaged,) = report.find_runs([str(tmp_path / "lr1e-2")])
    assert damaged.result["status"] == "incomplete" and damaged.result["best_val_loss"] is not None


def test_report_errors(tmp_path):
    result = lmtrain("report", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no such run or sweep dir" in result.stderr
    result = lmtrain("report", str(tmp_path))
    assert result.returncode == 2 and "holds no runs" in result.stderr


def test_optuna_sweep(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result, sweep_dir = sweep(
        tmp_path, corpus, "+search=optuna", "hydra.sweeper.n_trials=2", "scheduler.warmup_steps=choice(0,2)"
    )
    assert result.returncode == 0, result.stderr
    found = results(sweep_dir)
    assert len(found) == 2 and all(r["status"] == "completed" for r in found.values())
    assert (sweep_dir / "optimization_results.yaml").is_file()


def test_tensorboard_logging(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain.run(compose(*TINY, f"data.train={corpus}", "trainer.tensorboard=true"), str(tmp_path))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [0, 3, 6]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/ppl"} <= set(events.Tags()["scalars"])


def test_every_swept_group_option_is_checked_first(tmp_path, corpus):
    result, sweep_dir = sweep(tmp_path, corpus, "model=tiny,tinyy")
    assert result.returncode == 2 and not sweep_dir.exists()
    assert result.stderr.strip().splitlines() == [
        "lmtrain pretrain: error: model=tinyy: no such option; choose from gpt2_124m, llama3_1b, llama_small, "
        "mistral_7b, modern_small, qwen2_0_5b, qwen3_0_6b, small, smollm2_135m, tiny "
        "(did you mean 'tiny'?)"
    ]
