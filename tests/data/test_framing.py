"""The sequences lmtrain trains on are framed as the model's tokenizer frames them at inference: a BOS first
where the tokenizer puts one (Llama, Mistral), none where it does not (Qwen2), in every task and in
pretraining shards."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import prepare_tokens
from hf_models import tokenizer_for

from lmtrain.data.tokenizer import SpecialTokens, document_framing
from lmtrain.tasks.registry import task_class, task_for

TEXTS = ["the quick brown fox", "def f(x): return x"]


def hf_and_special(family: str):
    import transformers

    tokenizer, names = tokenizer_for(family)
    eos, bos = tokenizer.token_to_id(names["eos"]), tokenizer.token_to_id(names["bos"]) if "bos" in names else None
    adds = bos is not None and tokenizer.encode("a").ids[:1] == [bos]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=names["eos"])
    return tokenizer, hf, SpecialTokens(end_of_text=eos, stop=[eos], bos=bos, adds_bos=adds)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_every_task_frames_its_text_as_the_tokenizer_does(family):
    tokenizer, hf, special = hf_and_special(family)
    eot = special.end_of_text
    framed = [hf(text)["input_ids"] for text in TEXTS]  # what transformers and vLLM feed the model
    assert (framed[0][0] == special.bos) == (family != "qwen2")

    def task(name, fields, records):
        info = task_class(name).build_info(_cfg(name), fields, records)
        return task_for(info, tokenizer, 64, special).encode(records, "data.train")

    lm = task("lm", {"text": "text", "prompt": "prompt", "response": "response"}, [{"text": t} for t in TEXTS])
    assert [e.ids for e in lm] == [ids + [eot] for ids in framed]
    pairs = [{"prompt": TEXTS[0], "response": TEXTS[1]}]
    (instruction,) = task("lm", {"text": "text", "prompt": "prompt", "response": "response"}, pairs)
    assert instruction.ids[: instruction.loss_start] == framed[0] + [eot]
    (translation,) = task("seq2seq", {"source": "source", "target": "target"}, [{"source": TEXTS[0], "target": "x"}])
    assert translation.ids[: translation.loss_start] == framed[0] + [eot]
    classified = task(
        "classification", {"text": "text", "label": "label"}, [{"text": t, "label": i} for i, t in enumerate(TEXTS)]
    )
    assert [e.ids for e in classified] == [ids + [eot] for ids in framed]


def _cfg(name: str):
    from lmtrain.config import TaskConfig

    return TaskConfig(name=name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_pretraining_documents_start_as_the_tokenizer_starts_a_text(tmp_path, family):
    tokenizer, names = tokenizer_for(family)
    eos = tokenizer.token_to_id(names["eos"])
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS * 2))
    data = prepare_tokens(
        tmp_path / "cache", tmp_path / "docs.jsonl", existing=tokenizer, end_of_text=eos, val_fraction=0.0
    )
    plain = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS * 2]
    head = tokenizer.encode("x").ids[:1] if family == "llama" else []
    expected = head + plain[0] + [eos] + head + plain[1] + [eos] + head + plain[2] + [eos] + head + plain[3]
    assert np.asarray(data.train).tolist() == expected
    assert document_framing(tokenizer, eos) == (head, [eos] + head)


@pytest.mark.parametrize(
    "family, first, last", [("llama", "<|begin_of_text|>", "<|end_of_text|>"), ("qwen2", "the", "<|im_end|>")]
)
def test_inspect_reads_a_hugging_face_model_with_its_own_special_tokens(tmp_path, family, first, last):
    import json

    from hf_models import build

    from lmtrain.cli import check
    from lmtrain.commands import inspect
    from lmtrain.config import InspectConfig

    folder = build(family, tmp_path / family)
    inspect.run(
        check("inspect", InspectConfig, [f"ckpt={folder}", "text=the fox", "views=[loss]", "device=cpu"]),
        str(tmp_path / "i"),
    )
    labels = json.loads((tmp_path / "i" / "inspect.json").read_text())["tokens"]
    assert labels[0] == first and labels[-1] == last
