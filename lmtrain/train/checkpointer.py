"""The run's checkpoint writer: when the trainer asks, gathers the whole state (FSDP shards included) and
saves `step_NNNNNNN` (+ `latest`, pruned to trainer.keep_last) or `best`."""

from __future__ import annotations

from pathlib import Path

import torch

from lmtrain.checkpoint import files as checkpoint
from lmtrain.core import distributed
from lmtrain.model.transformer import TransformerLM
from lmtrain.train.resume import Sampler
from lmtrain.train.trainer import Trainer


class Checkpointer:
    """Writes the run's checkpoints: `step_NNNNNNN` (+ `latest`) and, for finetuning, `best`. Every process
    takes part (FSDP gathers whole tensors); the main process writes."""

    def __init__(self, run_dir: Path, trainer: Trainer, sampler: Sampler, files: dict[str, str], keep_last: int):
        self.root = run_dir / "checkpoints"
        self.trainer, self.sampler, self.files, self.keep_last = trainer, sampler, files, keep_last
        # an adapter run saves only what it trains (the adapters, a task head); its base stays where it is
        adapter = checkpoint.ADAPTER_FILE in files
        self.trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad} if adapter else None

    def _gathered(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None, dict]:
        """The model to save (or, for an adapter run, the trained tensors) and the optimizer state."""
        trainer = self.trainer
        trained = self.trained
        if trainer.placement.strategy != "fsdp":
            weights = None if trained is None else {k: v for k, v in trainer.model.state_dict().items() if k in trained}
            return trainer.model, weights, trainer.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = checkpoint.full_state_options()
        full = get_model_state_dict(trainer.model, options=options)
        optimizer_state = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
        if not trainer.placement.is_main:  # full state dicts are gathered on the main process only
            return trainer.model, None, {}
        optimizer_state = checkpoint.numbered_optimizer_state(optimizer_state)
        tensors = {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}  # full state: plain tensors
        if trained is not None:
            return trainer.model, {k: v for k, v in tensors.items() if k in trained}, optimizer_state
        whole = TransformerLM(trainer.model.config)
        whole.load_state_dict(tensors)
        return whole, None, optimizer_state

    def _save(self, name: str | None) -> None:
        trainer = self.trainer
        model, weights, optimizer_state = self._gathered()
        if trainer.placement.is_main:
            rng = {"torch_cpu": torch.get_rng_state()}
            rng.update({f"sampler.{k}": v for k, v in self.sampler.state_dict().items()})
            if trainer.device.type == "cuda":
                rng["torch_cuda"] = torch.cuda.get_rng_state(trainer.device)
            state = {
                "trainer": trainer.state.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "grad_scaler": trainer.scaler.state_dict(),
                "world_size": trainer.placement.world_size,
            }
            checkpoint.save(
                self.root,
                trainer.state.step,
                model=model,
                optimizer_state=optimizer_state,
                rng=rng,
                trainer_state=state,
                files=self.files,
                name=name,
                weights=weights,
                ema=trainer.ema.state_dict() if trainer.ema is not None else None,
            )
            if name is None:
                checkpoint.prune(self.root, self.keep_last)
        distributed.barrier()

    def save(self) -> None:
        self._save(None)

    def save_best(self) -> None:
        self._save("best")
