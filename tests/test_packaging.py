"""The configs ship inside the package: a plain (non-editable) install finds them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_non_editable_install_finds_the_configs(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    shipped = {p.relative_to(site / "lmtrain" / "configs") for p in (site / "lmtrain" / "configs").rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml")}
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import lmtrain, sys; from lmtrain.cli import main; print(lmtrain.__file__); main(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", code, "pretrain", "--cfg", "job", "model=tiny"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(site)) and "d_model: 64" in result.stdout
