"""Bottleneck adapters: identity at init, the closed-form parameter count, training, save/load,
disable, several adapters, unload, and errors."""

import copy
import json
import os
import types

import pytest
import torch
from torch import nn

import peftkit
from conftest import train_steps, trainer_changes
from peftkit import models
from peftkit.methods.bottleneck import ARCHITECTURES, BlockLayout, BottleneckLayer


def tiny(kind: str, seed: int = 0) -> nn.Module:
    from transformers import (MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              RobertaConfig, RobertaForSequenceClassification)

    if kind == "llama":
        return models.tiny_llama(seed)
    if kind == "gpt2":
        return models.tiny_gpt2(seed)
    if kind == "bert":
        return models.tiny_bert(seed)
    torch.manual_seed(seed)
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**small, num_key_value_heads=1)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=1)).eval()
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**small, pad_token_id=1)).eval()
    raise ValueError(kind)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return dict(input_ids=ids, attention_mask=mask)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def perturbed(model, seed=5, scale=0.3):
    """Give every adapter tensor of the active adapter a random value (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_tensors(model.active_adapter).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("kind,variant", [
    ("llama", "houlsby"), ("llama", "pfeiffer"), ("mistral", "houlsby"), ("qwen2", "pfeiffer"),
    ("gpt2", "houlsby"), ("bert", "houlsby"), ("roberta", "pfeiffer"),
])
def test_identity_at_init_and_adapter_changes_output(kind, variant, batch):
    base = logits(tiny(kind), batch)
    model = peftkit.get_peft_model(tiny(kind), peftkit.AdapterConfig(variant=variant,
                                                                     reduction_factor=4))
    torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)
    perturbed(model)
    assert (logits(model, batch) - base).abs().max() > 1e-3


def closed_form(layers: int, sites: int, d: int, m: int) -> int:
    return layers * sites * (2 * d * m + m + d)


def meta_model(kind: str) -> nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        if kind == "bert-base":
            return BertModel(BertConfig())  # hidden 768, 12 layers
        # SmolLM2-135M's shape: hidden 576, 30 layers
        return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576,
                                            intermediate_size=1536, num_hidden_layers=30,
                                            num_attention_heads=9, num_key_value_heads=3))


@pytest.mark.parametrize("kind,d,layers", [("bert-base", 768, 12), ("llama", 576, 30)])
@pytest.mark.parametrize("kw,sites,m,blocks", [
    (dict(variant="houlsby"), 2, None, None),
    (dict(variant="pfeiffer"), 1, None, None),
    (dict(variant="houlsby", bottleneck_size=64), 2, 64, None),
    (dict(variant="pfeiffer", reduction_factor=8, layers_to_transform=[0, 3]), 1, None, 2),
])
def test_trainable_count_is_closed_form(kind, d, layers, kw, sites, m, blocks):
    base = meta_model(kind)
    n_base = sum(p.numel() for p in base.parameters())
    model = peftkit.get_peft_model(base, peftkit.AdapterConfig(**kw))
    m = m or d // kw.get("reduction_factor", 16)
    expected = closed_form(blocks or layers, sites, d, m)
    assert model.get_nb_trainable_parameters() == (expected, n_base + expected)
    if kind == "bert-base" and kw == dict(variant="houlsby"):
        assert expected == 1_789_056  # the docstring's example


def test_training_reduces_loss(batch):
    # initializer_range 0.2: with the default 0.02 the tiny model's logits barely move
    base = models.tiny_llama(initializer_range=0.2)
    model = peftkit.get_peft_model(base, peftkit.AdapterConfig(reduction_factor=2))
    model.train()
    losses = train_steps(model, batch, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0]


def test_save_load_round_trip(batch, tmp_path):
    cfg = peftkit.AdapterConfig(variant="pfeiffer", bottleneck_size=3, non_linearity="gelu",
                                layers_to_transform=1)
    model = perturbed(peftkit.get_peft_model(models.tiny_gpt2(), cfg))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["non_linearity"] == "gelu"
    loaded = peftkit.PeftModel.from_pretrained(models.tiny_gpt2(), tmp_path)
    assert sorted(loaded.adapter_tensors("default")) == [
        f"base_model.model.transformer.h.1.mlp_adapter.{w}.{k}"
        for w in ("down", "up") for k in ("bias", "weight")
    ]
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference


def test_disable_adapter(batch):
    base = logits(models.tiny_llama(), batch)
    model = perturbed(peftkit.get_peft_model(models.tiny_llama(), peftkit.AdapterConfig()))
    adapted = logits(model, batch)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, batch), adapted, atol=0, rtol=0)


def test_several_named_adapters(batch, tmp_path):
    model = perturbed(peftkit.get_peft_model(models.tiny_llama(), peftkit.AdapterConfig()))
    out_default = logits(model, batch)
    model.add_adapter("other", peftkit.AdapterConfig(variant="pfeiffer", non_linearity="silu"))
    model.set_adapter("other")
    perturbed(model, seed=7)
    out_other = logits(model, batch)
    assert (out_other - out_default).abs().max() > 1e-3
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), out_default, atol=0, rtol=0)

    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    fresh = peftkit.PeftModel.from_pretrained(models.tiny_llama(), tmp_path)
    fresh.load_adapter(tmp_path / "other", "other")
    fresh.set_adapter("other")
    torch.testing.assert_close(logits(fresh, batch), out_other, atol=0, rtol=0)

    model.delete_adapter("other")
    assert not any("other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), out_default, atol=0, rtol=0)


def test_merge_raises_and_unload_restores_base(batch):
    base = logits(models.tiny_bert(), batch)
    model = perturbed(peftkit.get_peft_model(models.tiny_bert(), peftkit.AdapterConfig()))
    with pytest.raises(NotImplementedError, match="cannot be merged.*latency"):
        model.merge_and_unload()
    plain = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    assert not any(m._forward_hooks for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), base, atol=0, rtol=0)


def test_new_architecture_through_the_table(monkeypatch):
    """An entry in ARCHITECTURES is all a new architecture needs."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.ff = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            x = x + self.mix(x)
            return x + self.ff(x)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="toy", hidden_size=4)
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    monkeypatch.setitem(ARCHITECTURES, "toy", BlockLayout(blocks="blocks", attention="mix",
                                                          mlp="ff"))
    model = peftkit.get_peft_model(Toy(), peftkit.AdapterConfig(bottleneck_size=2))
    assert model.get_nb_trainable_parameters()[0] == closed_form(2, 2, 4, 2)


def test_errors():
    with pytest.raises(ValueError, match="variant: unknown preset 'houlsbi'"):
        peftkit.AdapterConfig(variant="houlsbi")
    with pytest.raises(ValueError, match="non_linearity"):
        peftkit.AdapterConfig(non_linearity="tanh")
    with pytest.raises(ValueError, match="reduction_factor: 32 is larger than the hidden size 16"):
        peftkit.get_peft_model(models.tiny_llama(), peftkit.AdapterConfig(reduction_factor=32))
    with pytest.raises(ValueError, match="layers_to_transform: block 5 does not exist"):
        peftkit.get_peft_model(models.tiny_llama(), peftkit.AdapterConfig(layers_to_transform=5))
    toy = nn.Module()
    toy.config = types.SimpleNamespace(model_type="mamba")
    with pytest.raises(ValueError,
                       match=r"no entry for model_type 'mamba'.*ARCHITECTURES\['mamba'\]"):
        peftkit.get_peft_model(toy, peftkit.AdapterConfig())


def test_trains_in_hf_trainer(tmp_path):
    model = peftkit.get_peft_model(models.tiny_llama(),
                                   peftkit.AdapterConfig(variant="pfeiffer", reduction_factor=4))
    changed, trainable = trainer_changes(model, tmp_path)
    assert changed == trainable
    assert changed and all(".mlp_adapter.adapters.default." in n for n in changed)


def test_deepcopy_is_independent(batch):
    model = perturbed(peftkit.get_peft_model(models.tiny_llama(), peftkit.AdapterConfig()))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, batch), logits(model, batch), atol=0, rtol=0)
    perturbed(twin, seed=11)
    assert (logits(twin, batch) - logits(model, batch)).abs().max() > 1e-3


def test_sequence_classification_head_trains_and_saves(tmp_path):
    """As for LoRA: task_type SEQ_CLS makes the new classifier head train and go in the file."""
    batch = dict(input_ids=torch.randint(3, 64, (2, 5)), labels=torch.tensor([0, 1]))
    cfg = peftkit.AdapterConfig(task_type="SEQ_CLS", variant="pfeiffer", reduction_factor=4)
    model = perturbed(peftkit.get_peft_model(models.tiny_bert(), cfg))
    keys = list(model.adapter_tensors("default"))
    assert "base_model.model.classifier.weight" in keys
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(models.tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)
