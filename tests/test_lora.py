"""LoRA behaviour on tiny models: identity at init, closed-form math, merge/unmerge, disable,
several adapters, save/load, and errors."""

import os

import pytest
import torch
from torch import nn

import peftkit
from conftest import TARGETS, make_model
from peftkit import models
from peftkit.methods.lora import LoraLinear

KINDS = ["llama", "gpt2"]


def out(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def trained(kind, seed=5, **kw):
    """A peft model whose B matrices are non-zero (as after training)."""
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind])
    cfg.update(kw)
    model = peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_tensors(model.active_adapter).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_identity_at_init(kind, init, tokens):
    base = out(make_model(kind), tokens)
    model = peftkit.get_peft_model(
        make_model(kind), peftkit.LoraConfig(r=4, target_modules=TARGETS[kind], init_lora_weights=init)
    )
    torch.testing.assert_close(out(model, tokens), base, atol=0, rtol=0)


def test_layer_closed_form():
    """y = x W0^T + b + (alpha/r) x A^T B^T, and merging gives W0 + (alpha/r) B A."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoraLinear(base)
    layer.add("default", r=2, alpha=3.0, scaling=1.5, dropout=0.0, init=False, dtype=torch.float32)
    layer.set_adapter(["default"])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, 8)
    w0 = base.weight.detach().clone()
    expected = x @ w0.T + base.bias + 1.5 * x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    layer.merge(["default"])
    torch.testing.assert_close(base.weight, w0 + 1.5 * b @ a, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_rslora_scaling():
    cfg = peftkit.LoraConfig(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 4},
                             alpha_pattern={"layers\\.1\\..*": 2})
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == (16, 8, 2.0)
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == (4, 8, 4.0)
    assert cfg.scaling_for("model.layers.1.self_attn.q_proj") == (4, 2, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_and_unload(kind, tokens):
    model = trained(kind)
    adapted = out(model, tokens)
    base = out(make_model(kind), tokens)
    assert (adapted - base).abs().max() > 1e-2
    model.merge_adapter()
    torch.testing.assert_close(out(model, tokens), adapted, atol=1e-5, rtol=0)
    model.merge_adapter()  # twice: must not add the delta again
    torch.testing.assert_close(out(model, tokens), adapted, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(out(model, tokens), adapted, atol=1e-5, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(out(model, tokens), base, atol=1e-5, rtol=0)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert type(merged) is type(make_model(kind))
    torch.testing.assert_close(out(merged, tokens), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_while_merged_and_unload(kind, tokens):
    model = trained(kind)
    adapted = out(model, tokens)
    base = out(make_model(kind), tokens)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(out(model, tokens), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(out(model, tokens), adapted, atol=1e-5, rtol=0)
    model.merge_adapter()
    original = model.unload()
    torch.testing.assert_close(out(original, tokens), base, atol=1e-5, rtol=0)


def test_safe_merge_refuses_non_finite(tokens):
    model = trained("llama")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, w)


def test_two_adapters_switch_exactly(tokens, tmp_path):
    first = trained("llama", seed=1)
    second = trained("llama", seed=2, r=2, target_modules=["q_proj", "k_proj"])
    out_first, out_second = out(first, tokens), out(second, tokens)
    second.save_pretrained(tmp_path / "second")
    first.load_adapter(tmp_path / "second", adapter_name="other")
    torch.testing.assert_close(out(first, tokens), out_first, atol=0, rtol=0)
    first.set_adapter("other")
    torch.testing.assert_close(out(first, tokens), out_second, atol=1e-6, rtol=0)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert trainable == set()  # loaded with is_trainable=False
    first.set_adapter("default")
    assert all(".default." in n for n, p in first.named_parameters() if p.requires_grad)
    torch.testing.assert_close(out(first, tokens), out_first, atol=0, rtol=0)
    first.delete_adapter("other")
    assert not any("other" in n for n, _ in first.named_parameters())
    torch.testing.assert_close(out(first, tokens), out_first, atol=0, rtol=0)


def test_save_layout_and_multi_adapter_folders(tmp_path):
    model = trained("llama")
    model.add_adapter("extra", peftkit.LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "extra"]
    assert sorted(os.listdir(tmp_path / "extra")) == ["adapter_config.json", "adapter_model.safetensors"]
    import json

    from safetensors import safe_open

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["inference_mode"] is True
    assert list(cfg) == sorted(cfg)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(k.startswith("base_model.model.") and "default" not in k for k in f.keys())


def test_round_trip_and_trainable_reload(tokens, tmp_path):
    model = trained("gpt2")
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    torch.testing.assert_close(out(loaded, tokens), out(model, tokens), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    again = peftkit.PeftModel.from_pretrained(make_model("gpt2"), tmp_path, is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_crash_mid_save_keeps_old_files(tmp_path, monkeypatch):
    model = trained("llama")
    model.save_pretrained(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("peftkit.checkpoint.save_file", boom)
    with torch.no_grad():
        next(iter(model.adapter_tensors("default").values())).add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before
    monkeypatch.undo()  # the disk has room again: the next save replaces the old files
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    for key, value in model.adapter_tensors("default").items():
        torch.testing.assert_close(loaded.adapter_tensors("default")[key], value, atol=0, rtol=0)


def test_load_errors(tmp_path):
    model = trained("llama")
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="missing"):
        peftkit.PeftModel.from_pretrained(models.tiny_llama(num_hidden_layers=3), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path / "nothing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle"):
        peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path / "b")
    import json

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["lora_bias"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="lora_bias"):
        peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path / "a")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "corda"}, "init_lora_weights"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"task_type": "CAUSAL"}, "task_type"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        peftkit.LoraConfig(**kwargs)


def test_target_matching_errors():
    with pytest.raises(ValueError, match=r"matched no module.*'q_proj'"):
        peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="not a linear layer"):
        peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(target_modules=["self_attn"]))


def test_target_selection_rules():
    def targeted(**kw):
        model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(**kw))
        return sorted(n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLinear))

    assert targeted(target_modules=["q_proj"], layers_to_transform=[1]) == ["model.layers.1.self_attn.q_proj"]
    assert targeted(target_modules=".*0.*_proj", exclude_modules=["k_proj", "o_proj"]) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    linear = targeted(target_modules="all-linear")
    assert len(linear) == 14 and "lm_head" not in linear
    assert targeted() == targeted(target_modules=["q_proj", "v_proj"])  # model-type default
