"""Packed sequences: attention within each example, positions restarting, loss and gradients equal to unpacked."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lmtrain.data.examples import Example, ExampleBatches, collate, collate_packed, pack
from lmtrain.data.tokens import with_documents
from lmtrain.model.transformer import TransformerConfig, TransformerLM, document_layout
from lmtrain.train.losses import cross_entropy


def examples(count: int = 12, seed: int = 0) -> list[Example]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(3, 14, (1,), generator=rng))
        ids = torch.randint(1, 40, (length,), generator=rng).tolist()
        out.append(Example(ids=ids, loss_start=int(torch.randint(0, length - 1, (1,), generator=rng))))
    return out


def loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    inputs, targets = batch
    logits = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    total, count = cross_entropy(logits, targets)
    (total / count).backward()
    return (total / count).detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_document_layout_is_block_diagonal_and_restarts_positions():
    positions, mask = document_layout(torch.tensor([[0, 0, 0, 1, 1, -1]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_loss_and_gradients_equal_unpacked(position):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, position=position)
    model = TransformerLM(config)
    data = examples()
    rows = pack([len(e.ids) - 1 for e in data], list(range(len(data))), width=24)
    assert sorted(i for row in rows for i in row) == list(range(len(data)))
    assert all(sum(len(data[i].ids) - 1 for i in row) <= 24 for row in rows) and len(rows) < len(data)
    packed = collate_packed([[data[i] for i in row] for row in rows], pad_id=0, ignore_index=-100)
    unpacked = collate(data, pad_id=0, ignore_index=-100)
    loss_p, grads_p = loss_and_grads(model, packed)
    loss_u, grads_u = loss_and_grads(model, unpacked)
    assert torch.allclose(loss_p, loss_u, atol=1e-5, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads_p, grads_u, strict=True))


def test_packed_batches_resume_exactly():
    data = examples(40)
    rows = partial(collate_packed, pad_id=0, ignore_index=-100)
    batches = ExampleBatches(data, 2, seed=3, collate=rows, pack_width=24)
    batches.next_step(2)
    state = batches.state_dict()
    expected = batches.next_step(2)
    resumed = ExampleBatches(data, 2, seed=3, collate=rows, pack_width=24)
    resumed.load_state_dict(state)
    for (a_in, a_t), (b_in, b_t) in zip(resumed.next_step(2), expected, strict=True):
        assert torch.equal(a_in["tokens"], b_in["tokens"]) and torch.equal(a_t, b_t)
        assert torch.equal(a_in["document_ids"], b_in["document_ids"])


def test_document_masking_of_pretraining_windows():
    """After an end-of-text, the window's logits equal those of the text from that end-of-text on, alone."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=32, num_heads=4, num_layers=2, position="rope"))
    eot = 19
    window = torch.tensor([[3, 4, 5, eot, 6, 7, 8, eot, 9]])
    inputs, _ = with_documents((window, window), eot)
    assert inputs["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2]]
    with torch.no_grad():
        masked = model(**inputs)
        alone = model(window[:, 3:7])
    assert torch.allclose(masked[:, 3:7], alone, atol=1e-5)


def test_pretrain_with_document_masking_then_finetune_packed(tmp_path, corpus):
    import json

    from conftest import TINY, compose

    from lmtrain.cli import check
    from lmtrain.commands import finetune, pretrain
    from lmtrain.config import FinetuneConfig

    pretrain.run(compose(*TINY, f"data.train={corpus}", "data.document_masking=true"), str(tmp_path / "base"))
    records = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ("cat", "dog", "mat", "log", "red") * 8]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = [
        f"init_from={tmp_path / 'base'}",
        "task=lm",
        f"data.train={tmp_path / 'train.jsonl'}",
        "data.packing=true",
        "epochs=2",
        "trainer.micro_batch_size=2",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "scheduler.warmup_steps=1",
        "optimizer.lr=3e-3",
    ]
    summary = finetune.run(check("finetune", FinetuneConfig, overrides), str(tmp_path / "ft"))
    # 36 training examples of ~12 tokens, packed 2 rows of 32 tokens a step: far fewer steps than 18 per epoch
    assert summary["steps"] < 2 * 18
    lines = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["val_loss"] for line in lines if "val_loss" in line]
    assert losses[-1] < losses[0]
