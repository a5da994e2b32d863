"""Preference losses (task.loss) over the log-probabilities of chosen and rejected answers, and the training
objective that computes them: the policy and the reference read the chosen and the rejected sequences of a
batch in one forward pass each (rows [0, B) chosen, [B, 2B) rejected).

Each loss names its paper and the TRL loss it equals (TRL 1.16: DPOTrainer loss_type, CPOTrainer, ORPOTrainer).
Log-probabilities are summed over the answer tokens; IPO, SimPO and ORPO use the mean per answer token, as TRL
does. Rewards, as TRL logs them: beta * (policy - reference) summed log-probs for the losses with a reference,
beta * the mean log-prob for SimPO and ORPO.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lmtrain.config.choices import PreferenceLoss
from lmtrain.core.distributed import all_reduce_sum, is_main_process
from lmtrain.model.lora import adapters_off
from lmtrain.model.transformer import TransformerLM

if TYPE_CHECKING:
    from lmtrain.train.trainer import Trainer

# losses that compare the policy with a reference model's log-probabilities
REFERENCE_FREE = {PreferenceLoss.simpo, PreferenceLoss.orpo}
# the metrics a preference run logs (TRL's names), in the order the objective's window sums them
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, T, V], next-token targets [N, T] -> (log-probability of each row's targets, summed over the
    positions != ignore_index [N], in fp32; the number of those positions [N])."""
    valid = targets != ignore_index
    per_token = -F.cross_entropy(
        logits.float().flatten(0, 1), targets.clamp_min(0).flatten(), reduction="none"
    ).view_as(targets)
    return (per_token * valid).sum(-1), valid.sum(-1)


@dataclass
class PairLogps:
    """Summed answer log-probabilities [B] of the policy (and reference), and the answers' token counts [B]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None  # [B] NLL summed over the whole chosen sequence (ORPO's SFT term)
    nll_weight: float = 1.0  # pairs / chosen-sequence tokens of the step: a sum over pairs / pairs = token mean

    @classmethod
    def of(cls, logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None) -> PairLogps:
        """From the [2B] log-probs and token counts of a batch (chosen rows first) and the reference's [2B]."""
        c, r = logps.chunk(2)
        nc, nr = tokens.chunk(2)
        rc, rr = ref.chunk(2) if ref is not None else (None, None)
        return cls(c, r, nc.clamp_min(1), nr.clamp_min(1), rc, rr)

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.ref_chosen is not None and self.ref_rejected is not None, "the loss needs a reference"
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


@dataclass
class Settings:
    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0


Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per-pair losses, chosen rewards, rejected rewards [B]


def _smoothed(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def dpo(p: PairLogps, s: Settings) -> Losses:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"): -log sigmoid(beta * (chosen logratio -
    rejected logratio)); with label_smoothing eps the conservative DPO of Mitchell (2023, "A note on DPO with
    noisy preferences"): -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d). TRL: loss_type="sigmoid"
    (TRL 1.16's sigmoid has no label smoothing; eps=0 equals it)."""
    chosen, rejected = p.logratios()
    return _smoothed(s.beta * (chosen - rejected), s.label_smoothing), s.beta * chosen, s.beta * rejected


def robust(p: PairLogps, s: Settings) -> Losses:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"): an unbiased loss under labels flipped with
    probability eps = label_smoothing, ((1 - eps) l(d) - eps l(-d)) / (1 - 2 eps), l = -log sigmoid(beta .).
    TRL: loss_type="robust"."""
    chosen, rejected = p.logratios()
    x, eps = s.beta * (chosen - rejected), s.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    return losses, s.beta * chosen, s.beta * rejected


def hinge(p: PairLogps, s: Settings) -> Losses:
    """The hinge loss of SLiC (Zhao et al. 2023, "SLiC-HF"): relu(1 - beta d). TRL: loss_type="hinge"."""
    chosen, rejected = p.logratios()
    return torch.relu(1 - s.beta * (chosen - rejected)), s.beta * chosen, s.beta * rejected


def ipo(p: PairLogps, s: Settings) -> Losses:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17): (d - 1 / (2 beta))^2 with d the difference of the logratios per answer token (as TRL's
    loss_type="ipo" normalises them; its rewards stay on the summed logratios)."""
    chosen, rejected = p.logratios()
    d = chosen / p.chosen_tokens - rejected / p.rejected_tokens
    return (d - 1 / (2 * s.beta)) ** 2, s.beta * chosen, s.beta * rejected


def simpo(p: PairLogps, s: Settings) -> Losses:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
    -log sigmoid(beta (mean chosen log-prob - mean rejected log-prob) - gamma), no reference; label_smoothing
    as in DPO. TRL: CPOTrainer with loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0 (no SFT term)."""
    chosen, rejected = p.means()
    return _smoothed(s.beta * (chosen - rejected) - s.gamma, s.label_smoothing), s.beta * chosen, s.beta * rejected


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(p: PairLogps, s: Settings) -> Losses:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"): the NLL of
    the chosen sequences minus beta log sigmoid(log odds(chosen) - log odds(rejected)), odds from the answers'
    mean log-probs; no reference. As TRL's ORPOTrainer, the NLL covers the whole chosen sequence, prompt
    included, averaged over those tokens of the whole optimizer step (`p.nll_weight`), so gradient
    accumulation stays exact."""
    assert p.chosen_nll is not None, "ORPO needs the chosen sequences' NLL"
    chosen, rejected = p.means()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return p.chosen_nll * p.nll_weight - s.beta * F.logsigmoid(log_odds), s.beta * chosen, s.beta * rejected


LOSSES: dict[PreferenceLoss, Callable[[PairLogps, Settings], Losses]] = {
    PreferenceLoss.dpo: dpo,
    PreferenceLoss.robust: robust,
    PreferenceLoss.hinge: hinge,
    PreferenceLoss.ipo: ipo,
    PreferenceLoss.simpo: simpo,
    PreferenceLoss.orpo: orpo,
}


def pair_metrics(p: PairLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair values of METRICS, [B, len(METRICS)] (detached)."""
    margin = chosen_rewards - rejected_rewards
    columns = (chosen_rewards, rejected_rewards, (margin > 0).float(), margin, p.chosen, p.rejected)
    return torch.stack([c.detach().float() for c in columns], dim=-1)


def _sequence_tokens(targets: dict) -> int:
    return int((targets["sequence_targets"] != targets["ignore_index"]).sum())


class Reference:
    """Where the reference log-probabilities come from: a frozen model, the policy with its LoRA adapters off,
    or a cache computed before training (key -> [pairs, 2] chosen and rejected summed log-probs)."""

    def __init__(
        self,
        model: TransformerLM | None = None,
        adapters: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
    ):
        self.model, self.adapters, self.cache = model, adapters, cache

    @contextlib.contextmanager
    def _model(self, policy: TransformerLM) -> Iterator[TransformerLM]:
        if self.model is not None:
            yield self.model
            return
        training = policy.training
        policy.eval()  # the reference never runs dropout
        try:
            with adapters_off(policy):
                yield policy
        finally:
            policy.train(training)

    @torch.no_grad()
    def logps(
        self, run: Callable[[Any, TransformerLM], torch.Tensor], policy: TransformerLM, batch: tuple[Any, dict]
    ) -> torch.Tensor:
        """[2B] summed answer log-probs of a batch (chosen rows first); `run(inputs, model)` gives logits."""
        inputs, t = batch
        if self.cache is not None:
            pairs = self.cache[t["key"]][t["pairs"]]
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        with self._model(policy) as model:
            logits = run(inputs, model)
        return sequence_logps(logits, t["targets"].to(logits.device), t["ignore_index"])[0]


class PreferenceObjective:
    """The preference task's training objective (lmtrain.train.objective.Objective): one forward of the
    policy over the batch's 2B sequences, the reference's log-probs, the loss summed over the B pairs."""

    def __init__(self, loss: PreferenceLoss, settings: Settings, reference: Reference | None, device: torch.device):
        self.loss_fn, self.settings, self.reference = LOSSES[loss], settings, reference
        self.window = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=device)  # sums, then pairs
        self.nll_weight: float | None = None  # ORPO, in training: pairs / chosen-sequence tokens of the step

    def count(self, batch: tuple[Any, dict]) -> int:
        return int(batch[1]["pairs"].numel())

    def begin_step(self, batches: list[tuple[Any, dict]], world: int, device: torch.device) -> None:
        """ORPO: the step's pairs per chosen-sequence token, over every process (read on the host)."""
        if self.loss_fn is not orpo:
            return
        pairs = float(sum(self.count(b) for b in batches))
        tokens = float(sum(_sequence_tokens(b[1]) for b in batches))
        if world > 1:
            pairs, tokens = all_reduce_sum(pairs, device), all_reduce_sum(tokens, device)
        self.nll_weight = pairs / max(tokens, 1)

    def scores(
        self, logits: torch.Tensor, batch: tuple[Any, dict], ref: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen rewards, rejected rewards) [B] of the policy's logits [2B, T, V] on a batch (and the
        reference's [2B] log-probs), and the per-pair METRICS [B, 6]."""
        t = batch[1]
        logps, tokens = sequence_logps(logits, t["targets"].to(logits.device), t["ignore_index"])
        pairs = PairLogps.of(logps, tokens, ref)
        if self.loss_fn is orpo:  # outside training, the batch's own pairs per token
            sequence = t["sequence_targets"].to(logits.device)
            pairs.chosen_nll = -sequence_logps(logits[: len(sequence)], sequence, t["ignore_index"])[0]
            weight = self.nll_weight
            pairs.nll_weight = weight if weight is not None else len(sequence) / max(_sequence_tokens(t), 1)
        losses, chosen, rejected = self.loss_fn(pairs, self.settings)
        return losses, chosen, rejected, pair_metrics(pairs, chosen, rejected)

    def loss(self, trainer: Trainer, batch: tuple[Any, dict]) -> torch.Tensor:
        ref = None
        if self.reference is not None:
            ref = self.reference.logps(lambda x, m: trainer.forward(x, m), trainer.model, batch)
        logits = trainer.forward(batch[0])
        losses, _, _, metrics = self.scores(logits, batch, ref)
        self.window[:-1] += metrics.detach().sum(0).double().to(self.window.device)
        self.window[-1] += len(losses)
        return losses.sum()

    def window_metrics(self, world: int) -> dict[str, float]:
        if world > 1:
            torch.distributed.all_reduce(self.window)
        sums = self.window.tolist()
        self.window.zero_()
        pairs = sums[-1]
        return {name: value / pairs for name, value in zip(METRICS, sums, strict=False)} if pairs else {}

    def gather_window(self, world: int) -> None:
        if world > 1:
            torch.distributed.all_reduce(self.window)
            if not is_main_process():
                self.window.zero_()

    def state_dict(self) -> dict:
        return {"window": self.window.tolist()}

    def load_state_dict(self, state: dict) -> None:
        window = torch.tensor(state["window"], dtype=torch.float64, device=self.window.device)
        self.window = window if is_main_process() else torch.zeros_like(window)  # the main process holds it
