"""`frozen_linears` computes what the stock frozen linears compute, as accurately, and saves the
same for backward."""

import contextlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import peftkit
from peftkit import frozen_linear, models

needs_onednn = pytest.mark.skipif(not frozen_linear.onednn_available(),
                                  reason="oneDNN's linear: x86 only")


def error_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """u * sqrt(k) * max |x| @ |W|^T: the probabilistic rounding-error bound of a length-k fp32
    dot product (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.5)."""
    k = x.shape[-1]
    return 2.0**-24 * k**0.5 * (x.abs().double() @ weight.abs().double().t()).max()


@needs_onednn
@pytest.mark.parametrize("shape, n_out, bias, transposed", [
    ((300, 576), 1536, False, False), ((3, 100, 1536), 576, True, False),
    ((300, 64), 48, False, True)])
def test_values_and_input_gradient_within_the_fp32_bound(shape, n_out, bias, transposed):
    """Against float64, FrozenLinear's output and input gradient are within the fp32 rounding
    bound, as torch's own F.linear (MKL) is; contiguous, transposed and 3-D inputs,
    non-contiguous gradients. (A bf16 GEMM would miss the bound ~1000x. The two libraries' RMS
    errors relative to each other depend on each CPU's blocking, measured 1-2.1x on SmolLM2's
    shapes, so they are not compared.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape[::-1], generator=g).t() if transposed else torch.randn(shape, generator=g)
    weight = torch.randn(n_out, shape[-1], generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    grad = torch.randn(n_out, *shape[:-1], generator=g).movedim(0, -1)  # non-contiguous
    x64 = x.double().requires_grad_()
    ref = F.linear(x64, weight.double(), None if b is None else b.double())
    ref.backward(grad.double())
    for fn in (F.linear, frozen_linear.FrozenLinear.apply):
        xg = x.clone().requires_grad_()
        y = fn(xg, weight, b)
        y.backward(grad)
        assert (y - ref).abs().max() <= error_bound(x, weight)
        assert (xg.grad - x64.grad).abs().max() <= error_bound(grad, weight.t())


def lora_model():
    model = peftkit.get_peft_model(models.tiny_llama(0), peftkit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    return model.train()


@needs_onednn
def test_reroutes_frozen_fp32_linears_only_while_active():
    """Base layers and MLP projections are rerouted; trainable LoRA A/B and the trained copy of
    lm_head are not; all is restored on exit, also after an error; nothing under checkpointing."""
    model = lora_model()
    linears = frozen_linear.frozen_fp32_linears(model)
    rerouted = {n for n, m in model.named_modules() if m in linears}
    assert rerouted and all(n.endswith(("base_layer", "k_proj", "o_proj", "gate_proj", "up_proj",
                                        "down_proj", "original_module")) for n in rerouted)
    assert not any("lora_" in n or "modules_to_save" in n for n in rerouted)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_linear.frozen_linears(model):
            assert all("forward" in m.__dict__ for n, m in model.named_modules() if n in rerouted)
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    model.base_model.model.gradient_checkpointing_enable()
    assert frozen_linear.frozen_fp32_linears(model) == []


@needs_onednn
def test_lora_step_equals_stock_within_rounding(monkeypatch):
    """A LoRA training step: same loss, LoRA gradients within fp32 rounding (the matmuls' sums
    in another order), and the same bytes saved for backward; every frozen linear of the two
    layers (q, v base layers, k, o, gate, up, down) went through FrozenLinear."""
    calls = []
    real = frozen_linear.FrozenLinear.apply
    monkeypatch.setattr(frozen_linear.FrozenLinear, "apply",
                        lambda *a: calls.append(a[1].shape) or real(*a))
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for rerouted in (False, True):
        model = lora_model()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t,
                                                      lambda t: t):
            with frozen_linear.frozen_linears(model) if rerouted else contextlib.nullcontext():
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads, sorted(saved)))
    assert len(calls) == 2 * 7
    (loss, grads, saved), (ref_loss, ref_grads, ref_saved) = results
    assert saved == ref_saved
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)


@needs_onednn
def test_trainable_weight_or_bias_keeps_its_gradient():
    """A linear with a trainable bias is not rerouted; one unfrozen inside the context falls
    back to the stock op; FrozenLinear itself refuses trainable parameters."""
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).requires_grad_(False)
    model[0].bias.requires_grad_(True)
    assert frozen_linear.frozen_fp32_linears(model) == [model[1]]
    x = torch.randn(3, 8)
    with frozen_linear.frozen_linears(model):
        model[1].weight.requires_grad_(True)
        model(x).sum().backward()
    assert model[0].bias.grad is not None and model[1].weight.grad is not None
    with pytest.raises(ValueError, match="must not require gradients"):
        frozen_linear.FrozenLinear.apply(x, model[0].weight, model[0].bias)


def test_autocast_and_other_dtypes_keep_the_stock_op():
    """Under CPU autocast the linear runs in bf16 as torch's would; a bf16 model is not
    rerouted at all."""
    model = lora_model()
    x = torch.randn(2, 5, 16)
    mlp = model.base_model.model.model.layers[0].mlp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = mlp.gate_proj(x)
        with frozen_linear.frozen_linears(model):
            got = mlp.gate_proj(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    assert frozen_linear.frozen_fp32_linears(model.to(torch.bfloat16)) == []


def test_off_when_onednn_is_disabled():
    model = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    with torch.backends.mkldnn.flags(enabled=False):
        assert frozen_linear.frozen_fp32_linears(model) == []


@needs_onednn
def test_double_backward_matches_stock():
    """With create_graph the input gradient is itself differentiable, as F.linear's is."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 4, 5, generator=g), torch.randn(6, 5, generator=g)
    second = []
    for fn in (F.linear, frozen_linear.FrozenLinear.apply):
        xg = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(fn(xg, weight, None).pow(2).sum(), xg, create_graph=True)
        grad_x.pow(2).sum().backward()
        second.append(xg.grad)
    torch.testing.assert_close(second[1], second[0], rtol=1e-5, atol=1e-5)
