"""DoRA (`use_dora=True`) against Hugging Face PEFT: files, logits, gradients, merging.

Both libraries compute the same fp32 expression in a different order (B @ A vs B(A(I)).T, the
norm of the sum); 1e-5 on logits of order 1 leaves room for that rounding and for nothing else.
"""

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import TARGETS, logits, make_model, perturb_trainable


def kwargs_for(kind, **extra):
    return dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True,
                init_lora_weights=False) | extra


def trained_peft(kind, path, **extra):
    """A PEFT DoRA model with every adapter tensor moved off its init, saved to `path`."""
    ref = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kwargs_for(kind, **extra)))
    perturb_trainable(ref)
    ref.save_pretrained(path)
    return ref


def grads(model, tokens) -> dict[str, torch.Tensor]:
    """Gradients of the loss on `tokens`, by in-memory parameter name (the same in both)."""
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_matches_peft_and_leaves_the_model_unchanged(kind, tokens):
    """Default init: B = 0, so m is the row norm of W0 (columns of Conv1D's (in, out) weight)."""
    kw = kwargs_for(kind, init_lora_weights=True)
    ours = peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**kw))
    ref = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kw))
    ours_m = {n: p for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    ref_m = {n: p for n, p in ref.named_parameters() if "lora_magnitude_vector" in n}
    assert ours_m.keys() == ref_m.keys() and ours_m
    for n in ours_m:
        torch.testing.assert_close(ours_m[n], ref_m[n], atol=0, rtol=1e-6)
    torch.testing.assert_close(logits(ours, tokens), logits(make_model(kind), tokens),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_files_as_peft(kind, tmp_path):
    peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**kwargs_for(kind))) \
        .save_pretrained(tmp_path / "ours")
    trained_peft(kind, tmp_path / "ref")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    magnitudes = [k for k in ours if k.endswith(".lora_magnitude_vector")]
    assert magnitudes and len(magnitudes) == sum(k.endswith(".lora_A.weight") for k in ours)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_to_peftkit_logits_and_gradients(kind, tokens, tmp_path):
    ref = trained_peft(kind, tmp_path)
    ours = peftkit.PeftModel.from_pretrained(make_model(kind), tmp_path, is_trainable=True)
    ref.eval(), ours.eval()
    expected = logits(ref, tokens)
    assert (expected - logits(make_model(kind), tokens)).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    g_ref, g_ours = grads(ref, tokens), grads(ours, tokens)
    assert g_ours.keys() == g_ref.keys()
    assert any("lora_magnitude_vector" in n for n in g_ours)
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peftkit_to_peft_logits(kind, tokens, tmp_path):
    ours = perturb_trainable(peftkit.get_peft_model(make_model(kind),
                                                    peftkit.LoraConfig(**kwargs_for(kind))))
    ours.eval()
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(make_model(kind), tmp_path).eval()
    torch.testing.assert_close(logits(ref, tokens), logits(ours, tokens), atol=1e-5, rtol=0)


def test_dropout_in_training_matches_peft(tokens, tmp_path):
    """With dropout on, PEFT drops x once and recomputes W0 x on it; same mask, same output."""
    ref = trained_peft("llama", tmp_path, lora_dropout=0.5)
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    ref.train(), ours.train()
    torch.manual_seed(5)
    expected = ref(input_ids=tokens).logits
    torch.manual_seed(5)
    torch.testing.assert_close(ours(input_ids=tokens).logits, expected, atol=1e-5, rtol=0)
    torch.manual_seed(6)
    assert (ours(input_ids=tokens).logits - expected).abs().max() > 1e-3  # the mask matters


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_is_exact_and_unmerge_restores(kind, tokens, tmp_path):
    trained_peft(kind, tmp_path)
    ours = peftkit.PeftModel.from_pretrained(make_model(kind), tmp_path).eval()
    expected = logits(ours, tokens)
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    assert any(not torch.equal(p, base[n]) for n, p in ours.named_parameters() if n in base)
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)


def test_merging_two_adapters_equals_peft(tmp_path):
    """The second DoRA merge takes its norm from the unmerged W0, as PEFT's does."""
    trained_peft("llama", tmp_path / "a")
    ref_b = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**kwargs_for("llama")))
    perturb_trainable(ref_b, seed=9).save_pretrained(tmp_path / "b")
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", "b")
    ref = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "a")
    ref.load_adapter(tmp_path / "b", "b")
    merged_ours = ours.merge_and_unload(adapter_names=["default", "b"]).state_dict()
    merged_ref = ref.merge_and_unload(adapter_names=["default", "b"]).state_dict()
    assert merged_ours.keys() == merged_ref.keys()
    for k in merged_ref:
        torch.testing.assert_close(merged_ours[k], merged_ref[k], atol=1e-6, rtol=0)


def test_training_moves_the_magnitude(tokens):
    model = peftkit.get_peft_model(make_model("llama"),
                                   peftkit.LoraConfig(**kwargs_for("llama", init_lora_weights=True)))
    m = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    assert all(not torch.equal(p, m[n]) for n, p in model.named_parameters() if n in m)


def test_delete_adapter_removes_the_magnitude():
    model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(**kwargs_for("llama")))
    model.add_adapter("other", peftkit.LoraConfig(**kwargs_for("llama")))
    model.delete_adapter("other")
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert any("lora_magnitude_vector.default" in n for n, _ in model.named_parameters())
