"""The training loop: accumulate, clip, step, evaluate, log, checkpoint — and nothing else."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lmtrain.data.tokens import WindowSampler
from lmtrain.run_log import ProgressBar, perplexity

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets: int64 [batch, seq]
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # input tokens consumed
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    train_seconds: float = 0.0  # wall time in the loop, summed over resumes
    # the log window in progress, so a resumed run logs the same averages as one that never stopped
    window_loss: float = 0.0
    window_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        *,
        device: torch.device,
        precision: str = "fp32",
        grad_clip: float = 1.0,
        ignore_index: int = -100,
        compile: bool = False,
    ):
        self.model = model
        self.forward = torch.compile(model) if compile else model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.device = device
        self.amp_dtype = AMP_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.grad_clip = grad_clip if grad_clip > 0 else float("inf")
        self.ignore_index = ignore_index
        self.state = TrainState()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        non_blocking = self.device.type == "cuda"
        return tuple(t.to(self.device, non_blocking=non_blocking) for t in batch)

    def train_step(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over micro-batches. Returns (summed loss, grad norm), both still on the device.

        Each micro-batch's summed loss is divided by the target count of the whole step, so the gradient
        equals that of one large batch however the tokens are split. The count comes from the host-side
        targets: no device synchronisation.
        """
        self.model.train()
        count = max(1, sum(int((y != self.ignore_index).sum()) for _, y in batches))
        total = torch.zeros((), device=self.device)
        for batch in batches:
            inputs, targets = self._to_device(batch)
            with self.autocast():
                loss_sum, _ = self.loss_fn(self.forward(inputs), targets)
            self.scaler.scale(loss_sum / count).backward()
            total += loss_sum.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += sum(x.numel() for x, _ in batches)
        return total / count, grad_norm

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss per target token over `batches`."""
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        for batch in batches:
            inputs, targets = self._to_device(batch)
            with self.autocast():
                loss_sum, _ = self.loss_fn(self.forward(inputs), targets)
            total += loss_sum.double()
            count += int((batch[1] != self.ignore_index).sum())
        return total.item() / max(count, 1)

    def _validate(
        self, validation: list[Batch], write_metrics: Callable[[dict], None], bar: ProgressBar
    ) -> None:
        step, val_loss = self.state.step, self.evaluate(validation)
        self.state.last_val_loss = val_loss
        if step > 0 and (self.state.best_val_loss is None or val_loss < self.state.best_val_loss):
            self.state.best_val_loss = val_loss
        write_metrics({"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
        bar.write(f"step {step}: val_loss {val_loss:.4f}  val_ppl {perplexity(val_loss):.2f}")

    def fit(
        self,
        sampler: WindowSampler,
        validation: list[Batch],
        *,
        max_steps: int,
        accum_steps: int,
        micro_batch_size: int,
        eval_every: int,
        log_every: int,
        checkpoint_every: int,
        write_metrics: Callable[[dict], None],
        save_checkpoint: Callable[[], None],
        progress_bar: bool = True,
    ) -> None:
        bar = ProgressBar(max_steps, self.state.step, progress_bar)
        state = self.state
        window_loss = torch.tensor(state.window_loss, device=self.device)
        window_tokens = 0  # tokens/s counts this process's work only

        def checkpoint() -> None:
            state.window_loss = window_loss.item()
            save_checkpoint()

        try:
            if validation and self.state.step == 0:  # where the run starts from
                self._validate(validation, write_metrics, bar)
            window_start = time.perf_counter()
            while state.step < max_steps:
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm = self.train_step(sampler.next_step(accum_steps, micro_batch_size))
                window_loss += loss
                state.window_steps += 1
                window_tokens += accum_steps * micro_batch_size * sampler.seq_len
                step = state.step
                record = None
                if step % log_every == 0 or step == max_steps:
                    mean_loss = (window_loss / state.window_steps).item()  # waits for the device
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "loss": mean_loss,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "tokens_seen": state.tokens_seen,
                    }
                    state.train_seconds += elapsed
                    write_metrics(record)
                    window_loss.zero_()
                    state.window_steps, window_tokens = 0, 0
                bar.update(1, record)
                if validation and (step % eval_every == 0 or step == max_steps):
                    self._validate(validation, write_metrics, bar)
                if step % checkpoint_every == 0 or step == max_steps:
                    checkpoint()
                if state.window_steps == 0:  # time spent evaluating and saving between windows is not counted
                    window_start = time.perf_counter()
        finally:
            bar.close()
