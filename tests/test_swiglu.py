"""`lean_swiglu` computes bitwise what transformers' gated MLPs compute, and saves less."""

import contextlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import peftkit
from peftkit import swiglu

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
    with swiglu.lean_swiglu(model) if lean else contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls", swiglu.GATED_MLPS)
def test_every_listed_mlp_is_rerouted_and_bitwise_equal(cls):
    """Full fine-tuning of a tiny model of each listed class: same loss, same gradients, bit for
    bit; every MLP of that class is rerouted and gets its own forward back afterwards."""
    model = tiny(MODEL_TYPES[cls])
    mlps = [m for m in model.modules() if type(m).__name__ == cls]
    assert mlps and set(swiglu.lean_mlps(model)) >= set(mlps)
    ref_loss, ref_grads = step(model, lean=False)
    loss, grads = step(model, lean=True)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
    assert all("forward" not in m.__dict__ for m in mlps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_every_linear_is_bitwise_equal(dtype):
    """LoRA on gate, up and down (their outputs pass through SiluMul): same adapter gradients."""
    model = peftkit.get_peft_model(tiny("llama", dtype), peftkit.LoraConfig(
        r=4, target_modules="all-linear", lora_dropout=0.0))
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

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with swiglu.lean_swiglu(model) if lean else contextlib.nullcontext():
                model(input_ids=ids, labels=ids)
        return sum(storages.values())

    layers, inter = TINY["num_hidden_layers"], TINY["intermediate_size"]
    assert saved_bytes(False) - saved_bytes(True) == layers * 3 * 11 * inter * 4


def test_forward_restored_after_an_error():
    model = tiny("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with swiglu.lean_swiglu(model):
            assert len([m for m in model.modules() if "forward" in m.__dict__]) == 2
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_other_activations_and_mlps_are_left_alone():
    """GPT-2's MLP and a gated MLP with GELU (Gemma's) keep their own forward."""
    assert swiglu.lean_mlps(tiny("gpt2")) == []
    assert swiglu.lean_mlps(tiny("gemma")) == []


def test_nothing_rerouted_under_gradient_checkpointing():
    """A checkpointed layer recomputes its forward in backward, outside `lean_swiglu`; rerouting
    the first forward would make the two save different tensors (a CheckpointError)."""
    model = tiny("llama")
    ref_loss, ref_grads = step(model, lean=False)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert swiglu.lean_mlps(model) == []
    loss, grads = step(model, lean=True)
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
