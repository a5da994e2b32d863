"""Chat data: templates rendered as transformers renders them, the loss on assistant tokens only."""

from __future__ import annotations

import json

import pytest
from chat_templates import FAMILIES, chat_tokenizer
from hf_models import build, tokenizer_for

from lmtrain.core.errors import UserError
from lmtrain.data import chat, chat_template
from lmtrain.tasks.base import TaskInfo
from lmtrain.tasks.chat import Chat

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the fox? <|im_end|> <|eot_id|>"},  # spelled specials stay text
    {"role": "assistant", "content": "the quick brown fox"},
    {"role": "user", "content": "and the dog?"},
    {"role": "assistant", "content": "the lazy dog"},
]


def plain(tokenizer, text: str) -> list[int]:
    tokenizer.encode_special_tokens = True
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    "family, template, end_of_turn, special",
    [
        ("qwen2", CHATML, "<|im_end|>", {"eos_token": "<|im_end|>", "bos_token": ""}),
        ("llama", LLAMA3, "<|eot_id|>", {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"}),
    ],
)
def test_loss_mask_is_exactly_the_assistant_turns(family, template, end_of_turn, special):
    tokenizer, _ = tokenizer_for(family)
    ids, mask = chat.tokenize(tokenizer, template, CONVERSATION, special)
    rendered = chat_template.render(template, CONVERSATION, False, special)
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered  # nothing lost or added
    end = tokenizer.token_to_id(end_of_turn)
    expected = plain(tokenizer, "the quick brown fox") + [end] + plain(tokenizer, "the lazy dog") + [end]
    assert [t for t, m in zip(ids, mask, strict=True) if m] == expected
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(runs) == 2  # two contiguous turns, each right after its assistant header
    for start in runs:
        header = tokenizer.decode(ids[:start], skip_special_tokens=False)
        assert header.endswith("assistant\n") or header.endswith("assistant<|end_header_id|>\n\n")
    assert ids.count(end) == len(CONVERSATION)  # the user's spelled "<|im_end|>" is not a turn end


def test_generation_prompt_ends_with_the_assistant_header():
    tokenizer, _ = tokenizer_for("qwen2")
    special = {"eos_token": "<|im_end|>", "bos_token": ""}
    ids, _ = chat.tokenize(tokenizer, CHATML, CONVERSATION[:2], special, add_generation_prompt=True)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_bad_conversations_are_counted_not_trained(caplog):
    tokenizer, _ = tokenizer_for("qwen2")
    task = Chat(TaskInfo("chat", {"messages": "messages"}), tokenizer, 150, tokenizer.token_to_id("<|im_end|>"), CHATML)
    records = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "hi"}]},
        {"messages": CONVERSATION * 4},  # 400 tokens, longer than the context: truncated and counted
    ]
    examples = task.encode(records, "data.train")
    assert len(examples) == 2 and len(examples[0].ids) == 100 and len(examples[1].ids) == 151
    assert "skipped 2 of 4 conversations (first: record 2: no assistant turn to train on)" in caplog.text
    assert "1 of 4 examples exceed model.max_seq_len=150 tokens and were truncated" in caplog.text
    task.info.decoding["overlong"] = "drop"
    assert len(task.encode(records, "data.train")) == 1


def test_chat_finetune_of_an_hf_model_then_generate(tmp_path, capsys):
    from lmtrain.cli import check
    from lmtrain.commands import evaluate, finetune, generate
    from lmtrain.config import EvalDataConfig, EvaluateConfig, FinetuneConfig, GenerateConfig

    base = build("qwen2", tmp_path / "qwen2", chat_template=CHATML)
    lines = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("fox", "dog", "quick", "lazy") * 10
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    overrides = [
        f"init_from={base}",
        "task=chat",
        f"data.train={tmp_path / 'chats.jsonl'}",
        "data.packing=true",
        "adapter=lora",
        "epochs=null",
        "trainer.max_steps=20",
        "trainer.eval_every=20",
        "trainer.micro_batch_size=4",
        "scheduler.warmup_steps=2",
        "optimizer.lr=1e-2",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
    ]
    summary = finetune.run(check("finetune", FinetuneConfig, overrides), str(tmp_path / "run"))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert summary["steps"] == 20 and losses[-1] < losses[0]
    ckpt = tmp_path / "run" / "checkpoints" / "latest"
    cfg = EvaluateConfig(ckpt=str(ckpt), data=EvalDataConfig(test=str(tmp_path / "chats.jsonl")), device="cpu")
    evaluate.run(cfg, str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == "chat" and report["loss"] == pytest.approx(losses[-1], rel=0.3)
    capsys.readouterr()
    generate.run(GenerateConfig(ckpt=str(ckpt), prompt="say fox", max_new_tokens=5, temperature=0.0), ".")
    assert capsys.readouterr().out.strip()  # the reply alone, without the template
    from lmtrain.commands import inspect
    from lmtrain.config import InspectConfig

    inspect.run(InspectConfig(ckpt=str(ckpt), text="say fox", views=["loss"], device="cpu"), str(tmp_path / "i"))
    labels = json.loads((tmp_path / "i" / "inspect.json").read_text())["tokens"]
    assert labels[-1] == "<|im_end|>"  # the LoRA checkpoint's own end token, not <|endoftext|>


TALK = [  # whitespace that Llama 3 and Gemma trim; reasoning that Qwen3 drops from earlier turns
    {"role": "user", "content": "  say hello \n"},
    {"role": "assistant", "content": "<think>\nbe brief\n</think>\n\n hello fox "},
    {"role": "user", "content": "what is the dog?"},
    {"role": "assistant", "content": "<think>\nthe lazy one\n</think>\n\nthe lazy dog."},
]
# what each family trains on: the assistant turns as the template renders them, with its end of turn
TRAINED = {
    "chatml": ["<think>\nbe brief\n</think>\n\n hello fox <|im_end|>", TALK[3]["content"] + "<|im_end|>"],
    "llama3": ["<think>\nbe brief\n</think>\n\n hello fox<|eot_id|>", TALK[3]["content"] + "<|eot_id|>"],
    "qwen3": [" hello fox <|im_end|>", "<think>\nthe lazy one\n</think>\n\nthe lazy dog.<|im_end|>"],
    "mistral": [" <think>\nbe brief\n</think>\n\n hello fox </s>", " " + TALK[3]["content"] + "</s>"],
    "gemma": ["<think>\nbe brief\n</think>\n\n hello fox<end_of_turn>", TALK[3]["content"] + "<end_of_turn>"],
    "default": ["<think>\nbe brief\n</think>\n\n hello fox <|endoftext|>", TALK[3]["content"] + "<|endoftext|>"],
    "generation": ["<think>\nbe brief\n</think>\n\n hello fox <|im_end|>", TALK[3]["content"] + "<|im_end|>"],
}


def family(name: str):
    template, specials, plain_tokens, eos, bos = FAMILIES[name]
    tokenizer = chat_tokenizer(specials, plain_tokens)
    return tokenizer, template or chat.DEFAULT_TEMPLATE, {"eos_token": eos, "bos_token": bos or ""}


def trained_runs(tokenizer, ids, mask) -> list[str]:
    runs, current = [], []
    for token, trained in zip(ids, mask, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tokens_equal_transformers_apply_chat_template(name):
    import transformers

    tokenizer, template, special = family(name)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=special["eos_token"], bos_token=special["bos_token"] or None
    )
    for generation_prompt, messages in [(False, TALK), (True, TALK[:3]), (False, TALK[:2])]:
        ids, mask = chat.tokenize(tokenizer, template, messages, special, generation_prompt)
        expected = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation_prompt)
        assert ids == expected["input_ids"]
    ids, mask = chat.tokenize(tokenizer, template, TALK, special)
    assert trained_runs(tokenizer, ids, mask) == TRAINED[name]
    if name == "generation":  # the mask transformers derives from the {% generation %} blocks
        marked = hf.apply_chat_template(TALK, chat_template=template, return_assistant_tokens_mask=True)
        assert mask == [bool(m) for m in marked["assistant_masks"]]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_user_text_spelling_a_special_token_stays_text(name):
    import transformers

    tokenizer, template, special = family(name)
    spelled = " ".join(FAMILIES[name][1])  # every special token of the template, written by the user
    messages = [{"role": "user", "content": f"hi {spelled}"}, {"role": "assistant", "content": f"ok {spelled}"}]
    ids, mask = chat.tokenize(tokenizer, template, messages, special)
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat_template.render(template, messages, False, special)
    benign = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    template_ids = chat.tokenize(tokenizer, template, benign, special)[0]
    special_ids = set(tokenizer.get_added_tokens_decoder())
    assert [t for t in ids if t in special_ids] == [t for t in template_ids if t in special_ids]
    assert f"ok {spelled}" in trained_runs(tokenizer, ids, mask)[0]  # the spelled tokens trained as text
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=special["eos_token"], bos_token=special["bos_token"] or None
    )  # transformers keeps them text only when asked to
    assert ids == hf.apply_chat_template(messages, chat_template=template, sanitize_control_tokens=True)["input_ids"]
    assert ids != hf.apply_chat_template(messages, chat_template=template)["input_ids"]


def test_generation_tags_train_and_every_dropped_conversation_is_explained():
    tokenizer, template, special = family("generation")
    task = Chat(
        TaskInfo("chat", {"messages": "messages"}), tokenizer, 30, tokenizer.token_to_id("<|im_end|>"), template
    )
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (example,) = task.encode([{"messages": short}], "data.train")
    assert trained_runs(tokenizer, example.ids, example.loss_mask) == ["hello<|im_end|>"]
    task.info.decoding["overlong"] = "drop"
    with pytest.raises(UserError, match=r"data.train: no conversation left: dropped 2 conversations longer than 30"):
        task.encode([{"messages": TALK}, {"messages": TALK}], "data.train")


def test_generate_chat_names_the_templates_refusal_and_an_unencodable_template(tmp_path, tiny_checkpoint):
    from chat_templates import GEMMA

    from lmtrain.commands import generate
    from lmtrain.config import GenerateConfig

    folder = build("qwen2", tmp_path / "gemma_like", chat_template=GEMMA)
    asked = GenerateConfig(ckpt=str(folder), prompt="hi", chat=True, system="be brief", max_new_tokens=2, device="cpu")
    with pytest.raises(UserError, match=r"^chat: the chat template failed: System role not supported$"):
        generate.run(asked, ".")
    char_level = GenerateConfig(ckpt=str(tiny_checkpoint), prompt="the", chat=True, max_new_tokens=2, device="cpu")
    with pytest.raises(UserError, match=r"chat: the model's tokenizer cannot encode the chat template's text"):
        generate.run(char_level, ".")


def test_a_template_that_cannot_be_mapped_back_is_one_line_not_a_wrong_mask(caplog):
    tokenizer, _, special = family("chatml")
    counting = "{{ messages[-1]['content'] | length }}" + CHATML  # a header that depends on the last reply
    task = Chat(
        TaskInfo("chat", {"messages": "messages"}), tokenizer, 200, tokenizer.token_to_id("<|im_end|>"), counting
    )
    with pytest.raises(UserError, match="cannot map back to its messages"):
        task.encode([{"messages": TALK}], "data.train")
    assert "skipped 1 of 1 conversations (first: record 1: the chat template renders this conversation" in caplog.text
