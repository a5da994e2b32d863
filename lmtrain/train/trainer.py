"""The training loop: accumulate (retrying out-of-memory steps in smaller pieces), clip, step, the EMA update,
validate (with early stopping), log (with MFU) and checkpoint, at the times a `Cadence` says."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmtrain.config.choices import OnNonfinite, Precision
from lmtrain.core import devices, distributed
from lmtrain.core.distributed import Placement
from lmtrain.core.dtypes import autocast_dtype
from lmtrain.model.transformer import TransformerLM
from lmtrain.train.divergence import Divergence
from lmtrain.train.ema import EMA
from lmtrain.train.log_window import LogWindow
from lmtrain.train.losses import validation_loss
from lmtrain.train.micro_batch import run_splitting
from lmtrain.train.objective import Objective
from lmtrain.train.progress import ProgressBar
from lmtrain.train.sinks import Sink

log = logging.getLogger("lmtrain")

# A micro-batch: model inputs (token ids [batch, seq], or a dict of keyword tensors) and targets
# (token ids [batch, seq] or labels [batch]; ignore_index marks positions without loss).
Inputs = torch.Tensor | dict[str, torch.Tensor]
Batch = tuple[Inputs, torch.Tensor]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # input tokens consumed
    best_metric: float | None = None  # best value of the main validation metric so far
    last_metrics: dict[str, float] = field(default_factory=dict)  # the latest validation
    train_seconds: float = 0.0  # wall time in the loop, summed over resumes
    # the log window in progress, so a resumed run logs the same averages as one that never stopped
    window_loss: float = 0.0
    window_steps: int = 0
    skipped_steps: int = 0  # steps without an update (trainer.on_nonfinite=skip met a non-finite gradient)
    validations_since_best: int = 0  # validations after step 0 without a new best (early stopping counts them)
    micro_batch_split: int = 1  # micro_batch_size=auto: each micro-batch runs in this many pieces (out of memory)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _tokens(inputs: Inputs) -> torch.Tensor:
    return inputs["tokens"] if isinstance(inputs, dict) else inputs


@dataclass
class Cadence:
    """When the loop logs, validates and checkpoints: every N steps, and always at the last step."""

    max_steps: int
    eval_every: int
    log_every: int
    checkpoint_every: int

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def validates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.max_steps

    def checkpoints(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.max_steps


class Trainer:
    def __init__(
        self,
        model: TransformerLM,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        *,
        device: torch.device,
        precision: Precision = Precision.fp32,
        grad_clip: float = 1.0,
        ignore_index: int = -100,
        compile: bool = False,
        compile_eval: bool = False,
        peak_flops: float | None = None,
        teacher: nn.Module | None = None,
        placement: Placement | None = None,
        parallel: nn.Module | None = None,
        on_nonfinite: OnNonfinite = OnNonfinite.stop,
        ema: EMA | None = None,
        early_stopping_patience: int | None = None,
        objective: Objective | None = None,
    ):
        self.model = model  # the plain module: its parameters, its state
        self.placement = placement or Placement(device=device)
        self.parallel = parallel or model  # what runs forward/backward: model, DDP(model) or FSDP-sharded model
        # compiled once for training; evaluation (no_grad: another graph) runs eagerly unless compile_eval
        self.compiled = torch.compile(self.parallel) if compile else self.parallel
        self.evaluated = self.compiled if compile_eval else self.parallel
        self.peak_flops = peak_flops  # FLOP/s of one process's device (lmtrain.core.devices): MFU's denominator
        self.seq_len = 0  # tokens per sequence of the last step: the attention term of FLOPs per token
        self.optimizer, self.scheduler, self.loss_fn = optimizer, scheduler, loss_fn
        self.device, self.precision, self.amp_dtype = device, precision, autocast_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision is Precision.fp16)
        self.grad_clip = grad_clip if grad_clip > 0 else float("inf")
        self.ignore_index = ignore_index
        # distillation: a frozen model whose logits on the same inputs go to loss_fn as teacher_logits
        self.teacher = teacher
        # stop: fit raises Diverged at the first non-finite loss or grad norm; skip: such a step makes no
        # update (one host sync per optimizer step to know it)
        self.on_nonfinite = on_nonfinite
        self.last_step_skipped = False
        self.ema = ema  # the weight average: updated after every step, validated instead of the weights
        self.early_stopping_patience = early_stopping_patience  # None: train to max_steps
        self.objective = objective  # a task's own loss and unit count (preference), in place of loss_fn's
        self.state = TrainState()
        # micro_batch_size=auto in one process: an out-of-memory step is retried in smaller micro-batches
        self.retry_out_of_memory = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, inputs: Inputs, model: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Inputs moved to the device and run through the (compiled) model, under autocast."""
        run = model or self.compiled
        non_blocking = self.device.type == "cuda"
        with self.autocast():
            if isinstance(inputs, dict):
                return run(**{k: v.to(self.device, non_blocking=non_blocking) for k, v in inputs.items()})
            return run(inputs.to(self.device, non_blocking=non_blocking))

    def loss(self, batch: Batch) -> torch.Tensor:
        """Summed loss of one micro-batch."""
        if self.objective is not None:
            return self.objective.loss(self, batch)
        inputs, targets = batch
        output = self.forward(inputs)
        extra = {}
        if self.teacher is not None:
            with torch.no_grad():
                extra["teacher_logits"] = self.forward(inputs, self.teacher)
        with self.autocast():
            targets = targets.to(self.device, non_blocking=self.device.type == "cuda")
            loss_sum, _ = self.loss_fn(output, targets, **extra)
        return loss_sum

    def train_step(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over micro-batches. Returns (mean loss, grad norm), both still on the device.

        Each micro-batch's summed loss is divided by the target count (an objective's: its units) of the whole
        step, so the gradient equals that of one large batch however the targets are split. The count comes from
        the host-side targets: no device synchronisation.
        """
        self.model.train()
        world = self.placement.world_size
        objective = self.objective
        count = sum(objective.count(b) if objective else int((b[1] != self.ignore_index).sum()) for b in batches)
        if world > 1:  # the step's targets over all processes
            count = int(distributed.all_reduce_sum(count, self.device))
        count = max(count, 1)
        if objective is not None:
            objective.begin_step(batches, world, self.device)
        # DDP and FSDP average gradients over processes: scale by world / global count to get sum / count
        scale = world / count

        def backward(parts: list[Batch]) -> torch.Tensor:
            total = torch.zeros((), device=self.device)
            for i, batch in enumerate(parts):
                with distributed.gradient_sync(self.parallel, enabled=i == len(parts) - 1):
                    loss_sum = self.loss(batch)
                    self.scaler.scale(loss_sum * scale).backward()
                total += loss_sum.detach()
            return total

        free = lambda: self.optimizer.zero_grad(set_to_none=True)  # noqa: E731
        total, self.state.micro_batch_split = run_splitting(
            batches, self.state.micro_batch_split, backward, free, self.retry_out_of_memory
        )
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        # the grad norm is the same on every process, so all of them skip the same steps
        self.last_step_skipped = self.on_nonfinite is OnNonfinite.skip and not bool(torch.isfinite(grad_norm))
        if self.last_step_skipped:
            self.state.skipped_steps += 1
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None and not self.last_step_skipped:
            self.ema.update(self.state.step)
        self.state.tokens_seen += sum(_tokens(x).numel() for x, _ in batches) * world
        return total / count, grad_norm  # this process's share of the step's mean loss

    @torch.no_grad()
    def evaluate_loss(self, batches: Sequence[Batch]) -> float:
        """Mean cross-entropy per target over `batches`; processes split them and each batch counts once."""
        self.model.eval()
        rank, world = self.placement.rank, self.placement.world_size
        mine = batches[rank::world]
        total, count = validation_loss(mine, lambda batch: self.forward(batch[0], self.evaluated), self.ignore_index)
        for _ in range(-(-len(batches) // world) - len(mine)):  # every process runs as many forwards (FSDP)
            self.forward(batches[0][0], self.evaluated)
        return distributed.all_reduce_sum(total.item(), self.device) / max(
            distributed.all_reduce_sum(count, self.device), 1
        )

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Model FLOPs utilisation: training FLOPs per token × tokens/s (all processes) over the peak FLOP/s of
        all processes' devices (lmtrain.core.devices.mfu); None when the peak or the model's FLOPs are unknown."""
        flops_per_token = getattr(self.model, "flops_per_token", None)
        if not (tokens_per_s and self.peak_flops and flops_per_token and self.seq_len):
            return None
        achieved = flops_per_token(self.seq_len) * tokens_per_s / self.placement.world_size
        return devices.mfu(achieved, self.peak_flops, self.device, self.precision)

    def _validate(self, evaluate, main_metric, higher_is_better, sink: Sink, bar, save_best) -> None:
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            metrics = evaluate()
        step = self.state.step
        self.state.last_metrics = metrics
        value = metrics[main_metric]
        best = self.state.best_metric
        if step > 0 and (best is None or (value > best if higher_is_better else value < best)):
            self.state.best_metric = value
            self.state.validations_since_best = 0
            if save_best is not None:
                save_best()
        elif step > 0:
            self.state.validations_since_best += 1
        sink.write({"step": step, **{f"val_{k}": v for k, v in metrics.items()}}, "val")
        bar.write(f"step {step}: " + "  ".join(f"val_{k} {v:.4f}" for k, v in metrics.items()))

    def _checkpoint(self, window: LogWindow, divergence: Divergence, save_checkpoint: Callable[[], None]) -> None:
        """Save a checkpoint (not counted in the window's time) that holds the log window's loss so far."""
        divergence.check()
        self.state.window_loss = window.total(self.placement.world_size)
        if self.objective is not None:
            self.objective.gather_window(self.placement.world_size)
        window.pause(save_checkpoint)

    def _early_stop_note(self, main_metric: str) -> str:
        return f"stopping early, no better val_{main_metric} in {self.state.validations_since_best} validations"

    def patience_ran_out(self) -> bool:
        """Early stopping: `early_stopping_patience` validations in a row brought no new best."""
        patience = self.early_stopping_patience
        return patience is not None and self.state.validations_since_best >= patience

    def _step(
        self, next_step: Callable[[], list[Batch]], window: LogWindow, divergence: Divergence, compiling: bool
    ) -> tuple[float, torch.Tensor]:
        """One optimizer step; its loss joins the log window. Returns the step's LR and gradient norm."""
        lr = float(self.scheduler.get_last_lr()[0])
        batches = next_step()
        self.seq_len = _tokens(batches[0][0]).shape[-1]
        started = time.perf_counter()
        loss, grad_norm = self.train_step(batches)
        if compiling:  # torch.compile traces and compiles in the first call, on the host
            log.info("compile: training step compiled in %.1f s (its first step)", time.perf_counter() - started)
        if not self.last_step_skipped:
            window.loss += loss
            self.state.window_steps += 1
        # with fp16 an overflowing gradient is routine: the scaler skips it
        divergence.observe(self.state.step, loss, None if self.scaler.is_enabled() else grad_norm)
        return lr, grad_norm

    def _log_record(
        self, step: int, lr: float, grad_norm: torch.Tensor, window: LogWindow, accounting: Callable[[], dict] | None
    ) -> dict:
        """The metrics.jsonl record closing a log window (the mean loss over its steps, on every process)."""
        state = self.state
        if self.placement.world_size > 1:  # each process holds its share of the mean
            torch.distributed.all_reduce(window.loss)
        mean_loss = (window.loss / state.window_steps).item() if state.window_steps else float("nan")
        elapsed = time.perf_counter() - window.started
        tokens_per_s = (state.tokens_seen - window.start_tokens) / max(elapsed, 1e-9)
        record = {
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s),
            "tokens_seen": state.tokens_seen,
            **(accounting() if accounting is not None else {}),
            **(self.objective.window_metrics(self.placement.world_size) if self.objective is not None else {}),
        }
        if self.on_nonfinite is OnNonfinite.skip:
            record["skipped_steps"] = state.skipped_steps
        state.train_seconds += elapsed
        window.loss.zero_()
        state.window_steps = 0
        return record

    def fit(
        self,
        next_step: Callable[[], list[Batch]],
        evaluate: Callable[[], dict[str, float]] | None,
        *,
        cadence: Cadence,
        sink: Sink,
        save_checkpoint: Callable[[], None],
        save_best: Callable[[], None] | None = None,
        main_metric: str = "loss",
        higher_is_better: bool = False,
        progress_bar: bool = True,
        accounting: Callable[[], dict] | None = None,
    ) -> None:
        """Train until `cadence.max_steps`: `next_step()` gives the micro-batches of one optimizer step;
        `evaluate()` gives validation metrics (at step 0 and when the cadence says); `accounting()` adds the data
        sampler's counts to every log record. Early stopping ends the run (with a checkpoint) at the validation
        that runs out of patience."""
        state, world = self.state, self.placement.world_size
        window = LogWindow(torch.tensor(state.window_loss / world, device=self.device), state.tokens_seen)
        divergence = Divergence(cadence.max_steps + 1, self.device, world, self.on_nonfinite is OnNonfinite.stop)
        bar = ProgressBar(cadence.max_steps, state.step, progress_bar, self.placement.is_main)

        def validate() -> None:
            if evaluate is not None:
                divergence.check()
                self._validate(evaluate, main_metric, higher_is_better, sink, bar, save_best)

        with contextlib.closing(bar):
            if state.step == 0:  # where the run starts from
                window.pause(validate)
            compiling = self.compiled is not self.parallel
            while state.step < cadence.max_steps and not self.patience_ran_out():
                lr, grad_norm = self._step(next_step, window, divergence, compiling)
                compiling = False
                step = state.step
                record = self._log_record(step, lr, grad_norm, window, accounting) if cadence.logs(step) else None
                if record is not None:  # the next window starts (validating and saving pause it)
                    sink.write(record, "train")
                    divergence.check()
                    window.restart(state.tokens_seen)
                bar.update(1, record)
                if cadence.validates(step):
                    window.pause(validate)
                stop = self.patience_ran_out()
                if cadence.checkpoints(step) or stop:
                    self._checkpoint(window, divergence, save_checkpoint)
                if stop:
                    bar.write(f"step {step}: {self._early_stop_note(main_metric)}")
                    break
