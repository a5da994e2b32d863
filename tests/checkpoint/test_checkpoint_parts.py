"""The checkpoint writer and reader over a mapping of named parts (lmtrain.checkpoint.parts): every part's
state goes where the format says and comes back into fresh parts, whatever else the mapping holds."""

import dataclasses
import json

import numpy as np
import torch
from safetensors.torch import load_file

from lmtrain.checkpoint.parts import RngState
from lmtrain.checkpoint.resume import restore
from lmtrain.checkpoint.strategy import Local, strategy_for
from lmtrain.checkpoint.writer import Writer
from lmtrain.core.distributed import Placement
from lmtrain.data.tokens import WindowSampler
from lmtrain.model.transformer import TransformerConfig, TransformerLM
from lmtrain.train.trainer import TrainState

CONFIG = TransformerConfig(vocab_size=11, d_model=16, num_heads=2, num_layers=1, max_seq_len=8)


class Counter:
    """A part the format does not know by name: its JSON state goes to trainer_state.json under its name."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def make_parts(seed: int) -> dict:
    torch.manual_seed(seed)
    model = TransformerLM(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = np.arange(200, dtype=np.uint16) % 11
    return {
        "model": model,
        "optimizer": optimizer,
        "trainer": TrainState(),
        "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step)),
        "counter": Counter(),
        "rng": RngState(torch.device("cpu")),
        "sampler": WindowSampler(tokens, 8, seed=seed),
    }


def train_step(parts: dict) -> None:
    inputs, targets = parts["sampler"].next_step(1, 2)[0]
    logits = parts["model"](inputs + torch.randint(0, 1, inputs.shape))  # draws from the torch generator
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    parts["optimizer"].step()
    parts["optimizer"].zero_grad()
    parts["scheduler"].step()
    parts["trainer"].step += 1
    parts["counter"].value += 3


def test_every_part_is_saved_where_the_format_says_and_restored_into_fresh_parts(tmp_path):
    files = {
        "config.yaml": "optimizer:\n  name: adamw\n",
        "model.json": json.dumps(dataclasses.asdict(CONFIG)),
        "tokenizer.json": json.dumps({"model": "char"}),
    }
    parts = make_parts(seed=0)
    strategy = strategy_for(Placement())
    assert isinstance(strategy, Local)
    train_step(parts)
    Writer(tmp_path / "a", parts, strategy, files, keep_last=1).save(parts["trainer"].step)
    saved = tmp_path / "a" / "checkpoints" / "step_0000001"
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["counter"] == {"value": 3} and state["trainer"]["step"] == 1 and state["world_size"] == 1
    assert set(load_file(str(saved / "rng.safetensors"))) == {"torch_cpu", "sampler.generator", "sampler.windows"}
    assert not (saved / "ema.safetensors").exists()

    fresh = make_parts(seed=1)  # other weights, another sampler seed, another torch generator state
    assert restore(saved, fresh, strategy, files, tmp_path / "b") == 1
    assert fresh["counter"].value == 3 and fresh["trainer"].step == 1
    assert fresh["scheduler"].last_epoch == parts["scheduler"].last_epoch
    for name, tensor in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor), name
    # from here both continue the same: the data drawn, the generator, the optimizer's moments
    torch.set_rng_state(load_file(str(saved / "rng.safetensors"))["torch_cpu"])
    train_step(parts)
    restore(saved, fresh, strategy, files, tmp_path / "b")
    train_step(fresh)
    for name, tensor in parts["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[name], tensor), name
