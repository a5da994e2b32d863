"""The progress bar of a training run (tqdm), drawn by the main process only."""

from __future__ import annotations

from tqdm import tqdm


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
