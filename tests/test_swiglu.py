"""`use_lean_mlps` computes bitwise what transformers' gated MLPs compute, and saves less."""

import copy
import pickle

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import peftkit
from peftkit.fast import swiglu

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, moe_intermediate_size=8, shared_expert_intermediate_size=24,
            num_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# one model type per class in swiglu.GATED_MLPS
MODEL_TYPES = {"LlamaMLP": "llama", "MistralMLP": "mistral", "Olmo2MLP": "olmo2",
               "Qwen2MLP": "qwen2", "Qwen2MoeMLP": "qwen2_moe", "Qwen3MLP": "qwen3",
               "SmolLM3MLP": "smollm3"}


def tiny(model_type: str, dtype=torch.float32):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY)
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def step(model, lean: bool):
    """Loss and every trainable parameter's gradient after one forward and backward."""
    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    swiglu.use_lean_mlps(model, lean)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls", swiglu.GATED_MLPS)
def test_every_listed_mlp_is_rerouted_and_bitwise_equal(cls):
    """Full fine-tuning of a tiny model of each listed class: same loss, same gradients, bit for
    bit; every MLP of that class gets the lean forward, and its own back when switched off."""
    model = tiny(MODEL_TYPES[cls])
    mlps = [m for m in model.modules() if type(m).__name__ == cls]
    assert mlps and set(swiglu.lean_mlps(model)) >= set(mlps)
    ref_loss, ref_grads = step(model, lean=False)
    loss, grads = step(model, lean=True)
    assert all(isinstance(m.__dict__["forward"], swiglu.LeanForward) for m in mlps)
    swiglu.use_lean_mlps(model, False)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
    assert all("forward" not in m.__dict__ for m in mlps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_every_linear_is_bitwise_equal(dtype):
    """LoRA on gate, up and down (their outputs pass through SiluMul): same adapter gradients."""
    model = peftkit.get_peft_model(tiny("llama", dtype), peftkit.LoraConfig(
        r=4, target_modules="all-linear", lora_dropout=0.0), speed=False)
    ref_loss, ref_grads = step(model, lean=False)
    loss, grads = step(model, lean=True)
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


def test_one_intermediate_activation_fewer_is_saved():
    """Autograd keeps exactly one (B, T, I) tensor per layer fewer: silu(gate(x))."""
    model = tiny("llama")
    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(1))

    def saved_bytes(lean: bool) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        swiglu.use_lean_mlps(model, lean)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(storages.values())

    layers, inter = TINY["num_hidden_layers"], TINY["intermediate_size"]
    assert saved_bytes(False) - saved_bytes(True) == layers * 3 * 11 * inter * 4


def test_lean_model_deep_copies_and_pickles():
    """The lean forward is a plain object bound to its MLP: a deep copy or an unpickled model
    computes with its own MLPs, bitwise as the original."""
    model = tiny("llama")
    swiglu.use_lean_mlps(model)
    ref_loss, _ = step(model, lean=True)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        mlp = clone.model.layers[0].mlp
        assert mlp.__dict__["forward"].mlp is mlp
        assert torch.equal(step(clone, lean=True)[0], ref_loss)


def test_hooked_activation_keeps_the_stock_ops():
    """A hook on `act_fn` still fires: that MLP calls it instead of `SiluMul`."""
    model = tiny("llama")
    calls = []
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *a: calls.append(1))
    ref_loss, _ = step(model, lean=False)
    calls.clear()
    loss, _ = step(model, lean=True)
    assert calls == [1] and torch.equal(loss, ref_loss)


def test_other_activations_and_mlps_are_left_alone():
    """GPT-2's MLP and a gated MLP with GELU (Gemma's) keep their own forward."""
    assert swiglu.lean_mlps(tiny("gpt2")) == []
    assert swiglu.lean_mlps(tiny("gemma")) == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_bitwise_equal_under_gradient_checkpointing(reentrant):
    """A checkpointed layer recomputes its forward in backward with the same lean forward, so the
    two passes save the same tensors (no CheckpointError) and the gradients stay bitwise."""
    model = tiny("llama")
    model.config.use_cache = False
    ref_loss, ref_grads = step(model, lean=False)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    loss, grads = step(model, lean=True)
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
