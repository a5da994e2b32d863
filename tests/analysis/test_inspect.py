"""`lmtrain inspect`: attention, logit lens, token losses and contributions of a tiny trained model."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import lmtrain

from lmtrain.analysis import interpret
from lmtrain.checkpoint.load import load_model
from lmtrain.cli import check
from lmtrain.commands import evaluate, inspect
from lmtrain.config import EvaluateConfig, InspectConfig

TEXT = "the big cat sat on the mat."


@pytest.fixture(scope="module")
def model_and_tokens(tiny_checkpoint):
    model, tokenizer = load_model(str(tiny_checkpoint), torch.device("cpu"))
    return model.eval(), torch.tensor(tokenizer.encode(TEXT).ids)


def test_attention_rows_sum_to_one_are_causal_and_are_what_sdpa_uses(model_and_tokens):
    model, tokens = model_and_tokens
    layers = list(range(model.config.num_layers))
    result = interpret.trace(model, tokens, layers)
    n = len(tokens)
    for layer in layers:
        probs = result.attention[layer]
        assert probs.shape == (model.config.num_heads, n, n)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
        assert (probs.triu(diagonal=1) == 0).all()  # no token attends to a later one
    # the probabilities times the values give the attention output SDPA computed
    attn = model.blocks[0].attn
    with torch.no_grad():
        x = model.blocks[0].norm1(model.token_embedding(tokens[None]) + model.position_embedding(torch.arange(n)))
        v = attn.qkv(x).view(1, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
        expected = F.scaled_dot_product_attention(
            *attn.qkv(x).view(1, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4), is_causal=True
        )
    torch.testing.assert_close(result.attention[0][None] @ v, expected, atol=1e-5, rtol=1e-4)


def test_logit_lens_at_the_last_layer_is_the_models_prediction(model_and_tokens):
    model, tokens = model_and_tokens
    result = interpret.trace(model, tokens)
    top, probs = interpret.logit_lens(model, result.residuals)
    assert top.shape == (model.config.num_layers, len(tokens))
    with torch.no_grad():
        own = model(tokens[None])[0].softmax(-1)
    assert torch.equal(top[-1], own.argmax(-1))
    torch.testing.assert_close(probs[-1], own.max(-1).values)


def test_token_loss_total_is_evaluates_loss_and_files_are_written(tmp_path, tiny_checkpoint):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT + "\n")
    ckpt = f"ckpt={tiny_checkpoint}"
    evaluate.run(check("evaluate", EvaluateConfig, [ckpt, f"data.test={text_file}", "device=cpu"]), str(tmp_path / "e"))
    inspect.run(check("inspect", InspectConfig, [ckpt, f"text_file={text_file}", "device=cpu"]), str(tmp_path / "i"))
    loss = json.loads((tmp_path / "e" / "eval.json").read_text())["loss"]
    index = json.loads((tmp_path / "i" / "inspect.json").read_text())
    token_loss = index["views"]["loss"]
    assert token_loss["total"] / len(token_loss["per_token"]) == pytest.approx(loss, rel=1e-5)
    written = [token_loss["html"], index["views"]["logit_lens"]["png"], *index["views"]["attention"]["png"]]
    assert len(index["views"]["attention"]["png"]) == 2 * 2  # tiny: 2 layers x 2 heads
    for name in written:
        assert (tmp_path / "i" / name).stat().st_size > 0
    assert (tmp_path / "i" / written[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_contributions_explain_the_predicted_class(model_and_tokens):
    model, tokens = model_and_tokens
    torch.manual_seed(0)
    model.add_classifier(3)
    try:
        predicted, probs, scores = interpret.contributions(model, tokens)
        with torch.no_grad():
            logits = model(tokens[None], last_positions=torch.tensor([len(tokens) - 1]))[0]
        assert predicted == int(logits.argmax()) and torch.allclose(probs, logits.softmax(-1))
        # gradient x input of the token embeddings: by hand with autograd
        embedded = model.token_embedding(tokens[None]).detach().requires_grad_(True)
        x = embedded + model.position_embedding(torch.arange(len(tokens)))
        for block in model.blocks:
            x = block(x)
        logit = model.classifier(model.final_norm(x)[0, -1])[predicted]
        (grad,) = torch.autograd.grad(logit, embedded)
        torch.testing.assert_close(scores, (embedded * grad).sum(-1)[0])
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.remove_classifier()


def test_inspect_cli_writes_files_and_bad_input_is_one_line(tmp_path, tiny_checkpoint):
    result = lmtrain(
        "inspect",
        f"ckpt={tiny_checkpoint}",
        f"text={TEXT}",
        "views=[attention]",
        "layers=[1]",
        "heads=[0]",
        "device=cpu",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "attention_layer1_head0.png").is_file() and (tmp_path / "inspect.json").is_file()
    result = lmtrain("inspect", f"ckpt={tiny_checkpoint}", "text=hi", "layers=[7]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == "lmtrain inspect: error: layers: 7 is not a layer of this model (it has 2: 0..1)"
    result = lmtrain("inspect", "text=hi", "views=[lens]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lmtrain inspect: error: ckpt: missing; pass ckpt=outputs/<run>/checkpoints/latest",
        "lmtrain inspect: error: views: 'lens' is not one of loss, attention, logit_lens, contribution",
    ]
