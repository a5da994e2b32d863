"""A task's own training objective, in place of the token loss over targets: the seam a preference (or RL)
task plugs into the trainer. The trainer asks it how many units (pairs, sequences) a micro-batch holds, so
it divides the step's summed loss by the units of the whole step (gradient accumulation and DDP stay
exact), asks it for each micro-batch's summed loss, and adds its windowed metrics to every log record. The
window is summed on the device and over processes only when a record or a checkpoint needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lmtrain.train.trainer import Trainer


class Objective(Protocol):
    def count(self, batch: tuple[Any, Any]) -> int:
        """The units of a micro-batch the step's loss is averaged over, read on the host (no device sync)."""
        ...

    def begin_step(self, batches: list[tuple[Any, Any]], world: int, device: Any) -> None:
        """Called with the step's micro-batches before their losses: totals of the whole step, other than
        `count`, that a loss normalises by (ORPO's chosen-sequence tokens), over every process."""
        ...

    def loss(self, trainer: Trainer, batch: tuple[Any, Any]) -> Any:
        """The micro-batch's loss summed over its units (a scalar tensor with a graph); `trainer.forward`
        runs the model under the run's autocast."""
        ...

    def window_metrics(self, world: int) -> dict[str, float]:
        """The means of its metrics since the last call (over every process: a collective), for the log
        record."""
        ...

    def gather_window(self, world: int) -> None:
        """Before a checkpoint (a collective): the window's sums over every process, kept by the main process
        alone, so its `state_dict` holds the whole window; `load_state_dict` gives it back to the main process
        only, and the next record counts it once whatever the number of processes."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
