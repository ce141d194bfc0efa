"""(IA)^3: identity at init, interop with the real peft both ways, exact merge/unmerge, errors."""

import contextlib
import io

import peft
import pytest
import torch

import peftkit
from conftest import logits, perturb_trainable
from peftkit import models

MAKERS = {"llama": models.tiny_llama, "gpt2": models.tiny_gpt2}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_identity_at_init(kind, tokens):
    model = peftkit.get_peft_model(MAKERS[kind](), peftkit.IA3Config())
    base = logits(MAKERS[kind](), tokens)
    torch.testing.assert_close(logits(model, tokens), base, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_peft_to_peftkit_and_back(kind, tokens, tmp_path):
    ref = perturb_trainable(
        peft.get_peft_model(MAKERS[kind](), peft.IA3Config(task_type="CAUSAL_LM")), scale=0.3)
    ref.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(MAKERS[kind](), tmp_path / "peft")
    expected = logits(ref, tokens)
    assert (expected - logits(MAKERS[kind](), tokens)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(MAKERS[kind](), tmp_path / "ours")
    torch.testing.assert_close(logits(back, tokens), expected, atol=1e-5, rtol=0)


def test_trainable_parameters_line_matches_peft():
    def line(model):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.print_trainable_parameters()
        return buf.getvalue()

    ref = peft.get_peft_model(models.tiny_gpt2(), peft.IA3Config(task_type="CAUSAL_LM"))
    assert line(peftkit.get_peft_model(models.tiny_gpt2(), peftkit.IA3Config())) == line(ref)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_merge_unmerge_disable(kind, tokens):
    base = logits(MAKERS[kind](), tokens)
    model = perturb_trainable(peftkit.get_peft_model(MAKERS[kind](), peftkit.IA3Config()),
                              scale=0.3)
    adapted = logits(model, tokens)
    model.merge_adapter()
    model.merge_adapter()  # twice: must not scale again
    torch.testing.assert_close(logits(model, tokens), adapted, atol=1e-5, rtol=0)
    with model.disable_adapter():  # unmerges
        torch.testing.assert_close(logits(model, tokens), base, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, tokens), adapted, atol=1e-5, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="feedforward_modules: must be a subset"):
        peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        peftkit.IA3Config(init_ia3_weights="yes")
