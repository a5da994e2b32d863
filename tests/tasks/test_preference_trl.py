"""lmtrain's preference losses equal TRL's (1.16: DPOTrainer, CPOTrainer, ORPOTrainer) on a tiny random Llama:
the same weights in both libraries, the same token batch, the same reference; the loss and the gradient with
respect to every weight agree within 1e-5 in fp32."""

from pathlib import Path

import pytest
import torch
from hf_models import build

from lmtrain.checkpoint.load import load_model
from lmtrain.config.choices import PreferenceLoss
from lmtrain.hf.families import FAMILIES
from lmtrain.hf.save import hf_state
from lmtrain.train import preference

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A reference Llama and a policy (the reference's weights moved by noise), each as a folder."""
    root = tmp_path_factory.mktemp("trl")
    reference = build("llama", root / "reference")
    torch.manual_seed(1)
    policy = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy.save_pretrained(root / "policy")
    tokenizer = transformers.AutoTokenizer.from_pretrained(reference)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(root / "policy")
    g = torch.Generator().manual_seed(2)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 290, (n,), generator=g).tolist()

    pairs = [(ids(3 + i), ids(2 + 2 * i), ids(6 - i)) for i in range(4)]  # prompt, chosen, rejected
    return {"reference": reference, "policy": root / "policy", "tokenizer": tokenizer, "pairs": pairs, "root": root}


def hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _trainer(kind: str, m: dict, model, ref, **settings):
    """A TRL trainer of `kind` around the HF `model` (and `ref`), built on a placeholder data set."""
    import trl
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    data = datasets.Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 4)
    tokenizer = m["tokenizer"]
    common = dict(output_dir=str(m["root"] / kind), report_to="none", use_cpu=True, bf16=False)
    if kind == "dpo":
        args = trl.DPOConfig(**common, disable_dropout=True, **settings)
        return trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
    config, trainer = {"cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer)}[kind]
    args = config(**common, remove_unused_columns=False, **settings)
    return trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _lmtrain_batch(input_ids: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """lmtrain's batch of TRL's [2B, T] tokens and answer mask: inputs, next-token targets outside the answer -100."""
    targets = input_ids[:, 1:].masked_fill(~answer[:, 1:].bool(), -100)
    pairs = torch.arange(input_ids.shape[0] // 2)
    return input_ids[:, :-1], {"targets": targets, "pairs": pairs, "key": "data.train", "ignore_index": -100}


def _lmtrain_loss(m: dict, loss: PreferenceLoss, batch, settings: preference.Settings, reference: bool):
    """lmtrain's mean loss over the pairs, and the policy whose gradients it filled."""
    policy = load_model(str(m["policy"]), torch.device("cpu"), key="init_from")[0].train()
    ref = None
    if reference:
        frozen = load_model(str(m["reference"]), torch.device("cpu"), key="init_from")[0].eval()
        ref = preference.Reference(model=frozen).logps(lambda x, model: model(x), policy, batch)
    objective = preference.PreferenceObjective(loss, settings, None, torch.device("cpu"))
    losses = objective.scores(policy(batch[0]), batch, ref)[0]
    return losses, policy


def _assert_same_gradients(policy, hf_model) -> None:
    for p in policy.parameters():
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    ours = dict(hf_state(policy, FAMILIES["llama"]))
    theirs = {n: p.grad for n, p in hf_model.named_parameters()}
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("loss", "trl_name", "label_smoothing"),
    [("dpo", "sigmoid", 0.0), ("ipo", "ipo", 0.0), ("robust", "robust", 0.2), ("hinge", "hinge", 0.0)],
)
def test_dpo_family_equals_trl(models, loss, trl_name, label_smoothing):
    m = models
    model = hf(m["policy"])
    trainer = _trainer(
        "dpo", m, model, hf(m["reference"]), beta=0.5, loss_type=[trl_name], label_smoothing=label_smoothing
    )
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in m["pairs"]])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    settings = preference.Settings(beta=0.5, label_smoothing=label_smoothing)
    ours = _lmtrain_batch(batch["input_ids"], batch["completion_mask"])
    losses, policy = _lmtrain_loss(m, PreferenceLoss(loss), ours, settings, reference=True)
    losses.mean().backward()
    assert abs(losses.mean().item() - theirs.item()) < 1e-5
    _assert_same_gradients(policy, model)


def _features(pairs) -> list[dict]:
    """The tokenized rows TRL's CPO and ORPO collator pads (labels -100 on the prompt)."""
    rows = []
    for prompt, chosen, rejected in pairs:
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{side}_labels"] = [-100] * len(prompt) + answer
        rows.append(row)
    return rows


def _concatenated(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    pad = trainer.processing_class.pad_token_id
    both = trainer.concatenated_inputs(batch, padding_value=pad, device=torch.device("cpu"))
    return both["concatenated_input_ids"], both["concatenated_labels"] != -100


def test_simpo_equals_trl_cpo(models):
    m = models
    model = hf(m["policy"])
    trainer = _trainer("cpo", m, model, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0)
    batch = trainer.data_collator(_features(m["pairs"]))
    theirs, _ = trainer.get_batch_loss_metrics(model, batch)
    theirs.backward()
    ours = _lmtrain_batch(*_concatenated(trainer, batch))
    losses, policy = _lmtrain_loss(m, PreferenceLoss.simpo, ours, preference.Settings(beta=2.0, gamma=0.5), False)
    losses.mean().backward()
    assert abs(losses.mean().item() - theirs.item()) < 1e-5
    _assert_same_gradients(policy, model)


def test_orpo_equals_trl(models):
    """ORPO's loss (the chosen sequences' NLL, prompt included, averaged over their tokens, less the odds-ratio
    term) and its gradients equal TRL's ORPOTrainer on pairs of different lengths."""
    m = models
    model = hf(m["policy"])
    trainer = _trainer("orpo", m, model, None, beta=0.1)
    batch = trainer.data_collator(_features(m["pairs"]))
    theirs, _ = trainer.get_batch_loss_metrics(model, batch)
    theirs.backward()
    both = trainer.concatenated_inputs(batch, padding_value=0, device=torch.device("cpu"))
    input_ids, attention = both["concatenated_input_ids"], both["concatenated_attention_mask"].bool()
    inputs, targets = _lmtrain_batch(input_ids, both["concatenated_labels"] != -100)
    chosen = len(m["pairs"])
    targets["sequence_targets"] = input_ids[:chosen, 1:].masked_fill(~attention[:chosen, 1:], -100)
    losses, policy = _lmtrain_loss(m, PreferenceLoss.orpo, (inputs, targets), preference.Settings(beta=0.1), False)
    losses.mean().backward()
    assert len({len(c) for _, c, _ in m["pairs"]}) > 1  # the chosen answers differ in length
    assert abs(losses.mean().item() - theirs.item()) < 1e-5
    _assert_same_gradients(policy, model)
