"""The run's checkpoint writer: when asked, gathers the state of every part (FSDP shards included) and saves
`step_NNNNNNN` (+ `latest`, pruned to keep_last) or `best`."""

from __future__ import annotations

from pathlib import Path

from lmtrain.checkpoint import files as checkpoint
from lmtrain.checkpoint.parts import Parts, states
from lmtrain.checkpoint.strategy import Strategy
from lmtrain.core import distributed


class Writer:
    """Writes the run's checkpoints: `step_NNNNNNN` (+ `latest`) and, for finetuning, `best`. Every process
    takes part (FSDP gathers whole tensors); the main process writes.

    `parts`: the run's stateful parts by name (lmtrain.checkpoint.parts), "model" and "optimizer" among them;
    `files`: text files every checkpoint carries (config.yaml, model.json, tokenizer.json, ...)."""

    def __init__(self, run_dir: Path, parts: Parts, strategy: Strategy, files: dict[str, str], keep_last: int):
        self.root = run_dir / "checkpoints"
        self.parts, self.strategy, self.files, self.keep_last = parts, strategy, files, keep_last
        # an adapter run saves only what it trains (the adapters, a task head); its base stays where it is
        adapter = checkpoint.ADAPTER_FILE in files
        model = self.strategy.model(parts)
        self.trained = {n for n, p in model.named_parameters() if p.requires_grad} if adapter else None

    def save(self, step: int, name: str | None = None) -> None:
        """Checkpoint `step` (optimizer steps done): `step_NNNNNNN`, or with `name` ("best") that folder."""
        gathered = self.strategy.gather(self.parts, self.trained)
        placement = self.strategy.placement
        if placement.is_main:
            tensors, state = states(self.parts)
            checkpoint.save(
                self.root,
                step,
                model=gathered.model,
                optimizer_state=gathered.optimizer_state,
                rng=tensors[checkpoint.RNG_FILE],
                trainer_state={**state, "world_size": placement.world_size},
                files=self.files,
                name=name,
                weights=gathered.weights,
                ema=tensors.get(checkpoint.EMA_FILE),
            )
            if name is None:
                checkpoint.prune(self.root, self.keep_last)
        distributed.barrier()
