"""Adapter files cross between peftkit and Hugging Face PEFT in both directions, same logits."""

import contextlib
import io

import peft
import pytest
import torch

import peftkit
from conftest import TARGETS, logits, make_model, perturb_trainable
from peftkit.methods.base import TunerLayer

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "patterns": {"rank_pattern": {"0\\..*": 2}, "alpha_pattern": {".*1\\..*": 3.0}},
    "all_linear": {"target_modules": "all-linear"},
    "regex": {"target_modules": r".*\.(q_proj|c_attn)"},
}


def kwargs_for(kind, variant):
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS[kind],
              init_lora_weights=False)
    kw.update(VARIANTS[variant])
    return kw


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_to_peftkit(kind, variant, tokens, tmp_path):
    ref = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kwargs_for(kind, variant))).eval()
    perturb_trainable(ref)
    ref.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(make_model(kind), tmp_path).eval()
    base = logits(make_model(kind), tokens)
    expected = logits(ref, tokens)
    assert (expected - base).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peftkit_to_peft(kind, variant, tokens, tmp_path):
    ours = peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**kwargs_for(kind, variant)))
    ours.eval()
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(make_model(kind), tmp_path).eval()
    torch.testing.assert_close(logits(ref, tokens), logits(ours, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_files_and_trainable_line(kind, variant, tmp_path):
    """Same keys and shapes on disk, same trainable tensors, same printed line."""
    kw = kwargs_for(kind, variant)
    ref = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kw))
    ours = peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**kw))
    lines = []
    for m in (ref, ours):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            m.print_trainable_parameters()
        lines.append(buf.getvalue())
    assert lines[0] == lines[1]
    assert ref.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    ref_names = {n for n, p in ref.named_parameters() if p.requires_grad}
    our_names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert our_names == ref_names
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_seed_recipe_line_matches_peft_on_llama_shape():
    """The seed's config (r=16, alpha=32, q,k,v,o, dropout 0.05) on a Llama with GQA."""
    kw = dict(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
              target_modules=["q_proj", "v_proj", "k_proj", "o_proj"])
    ref = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**kw))
    ours = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(**kw))
    assert ref.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()


@pytest.mark.parametrize("bias", ["none", "all"])
def test_sequence_classification_both_ways(bias, tokens, tmp_path):
    """task_type=SEQ_CLS trains and saves the new classifier head, as PEFT does."""
    from peftkit.models import tiny_bert

    kw = dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], bias=bias,
              init_lora_weights=False)
    ref = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**kw)).eval()
    ours = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(**kw)).eval()
    assert ref.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    perturb_trainable(ref)
    ref.save_pretrained(tmp_path / "ref")
    loaded = peftkit.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ref").eval()
    torch.testing.assert_close(logits(loaded, tokens), logits(ref, tokens), atol=1e-5, rtol=0)
    perturb_trainable(ours, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, tokens), logits(ours, tokens), atol=1e-5, rtol=0)


def test_merging_another_adapter_keeps_its_modules_to_save(tokens, tmp_path):
    """merge_and_unload(adapter_names=["x"]) while "default" is active gives what PEFT computes
    with x alone, x's lm_head copy included (PEFT 0.21's own merge would keep default's copy)."""
    kw = dict(r=4, target_modules=TARGETS["llama"], modules_to_save=["lm_head"],
              init_lora_weights=False)
    ours = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(**kw)).eval()
    ours.add_adapter("x", peftkit.LoraConfig(**kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("default", "x"):
            for p in ours.adapter_tensors(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ours.save_pretrained(tmp_path, selected_adapters=["x"])
    expected = logits(peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "x").eval(),
                      tokens)
    assert (logits(ours, tokens) - expected).abs().max() > 1e-3  # default differs from x
    merged = ours.merge_and_unload(adapter_names=["x"])
    assert not any(isinstance(m, TunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, tokens), expected, atol=1e-5, rtol=0)
