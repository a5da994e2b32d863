"""What a run tells its user: `metrics.jsonl` (one JSON object per record) and the tqdm progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from lmtrain.errors import UserError


class MetricsFile:
    """Appends records to `metrics.jsonl` (and, optionally, TensorBoard). On resume from step k, records
    after k (from the interrupted tail of the earlier attempt) are dropped so the file reads as one
    uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = path
        self.tensorboard = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "trainer.tensorboard=true needs the tensorboard package: pip install 'lmtrain[tensorboard]'"
                ) from None
            # purge_step drops events an interrupted attempt wrote after the checkpoint we resume from
            purge = resume_step + 1 if resume_step is not None else None
            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=purge)
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            prefix = "val" if "val_loss" in record else "train"
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"{prefix}/{key.removeprefix('val_')}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool, main: bool = True):
        self.main = main  # only the main process draws the bar and prints
        # disable=None: draw only on a terminal, so logs and CI stay clean.
        self.bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None if enabled and main else True
        )

    def update(self, steps: int, record: dict | None = None) -> None:
        self.bar.update(steps)
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
                refresh=False,
            )

    def write(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
