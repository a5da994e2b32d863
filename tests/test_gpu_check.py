import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """scripts/gpu_check.sh --dry-run: the GPU check's own steps (prepare, train, read the figures) on CPU."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path)}
    out = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "== single" in out.stdout and "tokens/s" in out.stdout and "MFU" in out.stdout
    assert "gpu_check: done" in out.stdout and (tmp_path / "single" / "result.json").is_file()
