"""DoRA (`use_dora=True`) against Hugging Face PEFT: files, logits, gradients, merging.

Both libraries compute the same fp32 expression in a different order (B @ A vs B(A(I)).T, the
norm of the sum); 1e-5 on logits of order 1 leaves room for that rounding and for nothing else.
"""

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.fast import lora_fn
from peftkit.methods.lora import LoraLinear, VARIANTS
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
    """With dropout on, PEFT drops x once and recomputes W0 x on it; same mask, same output. The
    stock path (speed layer's LoRA function off) draws torch's mask as PEFT does; the fused path
    draws its own (`test_fused_dora_matches_the_closed_form_with_its_mask`)."""
    ref = trained_peft("llama", tmp_path, lora_dropout=0.5)
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    peftkit.fast.apply(ours, lora_function=False)
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


def dora_layer(bias: bool, p: float, seed: int = 0) -> LoraLinear:
    """A DoRA LoraLinear on nn.Linear(8 -> 6), every tensor off its init, in training mode."""
    torch.manual_seed(seed)
    layer = LoraLinear(torch.nn.Linear(8, 6, bias=bias))
    layer.add("default", r=4, alpha=8, scaling=2.0, dropout=p, init=False, dtype=torch.float32,
              variant=VARIANTS["use_dora"])
    layer.set_adapter(["default"])
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(6) + 0.5)
    layer.requires_grad_(True)  # the bias and W0 too: only what DoRA passes on may get gradient
    layer.base_layer.weight.requires_grad_(False)
    return layer.train()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_dora_matches_the_closed_form_with_its_mask(p, bias):
    """The fused DoRA function (speed layer on), given the mask it drew, equals autograd through
    PEFT's expression y + (f - 1) * base + f * s * B A x_d, with f = m / ||W0 + s B A||_row
    detached and base = y - bias (p = 0) or W0 x_d (p > 0): output and the gradients of x, A, B,
    m and a trainable bias, up to fp32 rounding (values of order 1-10)."""
    layer = dora_layer(bias, p)
    x = torch.randn(3, 5, 8, requires_grad=True)
    torch.manual_seed(7)
    keep = lora_fn.keep_mask(torch.Size((15, 8)), p, x.device).view(3, 5, 8) if p else None
    torch.manual_seed(7)
    out = layer(x)
    w = torch.randn_like(out)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight] + ([layer.base_layer.bias] * bias)
    got = torch.autograd.grad((out * w).sum(), params)

    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, w0, s = layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight, 2.0
    y = layer.base_layer(x)
    norm = torch.linalg.norm(w0 + s * (b @ a), dim=1).detach()
    f = m / norm
    xd = x if keep is None else x * keep / (1 - p)
    base = (y if not bias else y - layer.base_layer.bias) if keep is None else xd @ w0.T
    ref = y + (f - 1) * base + f * s * (xd @ a.T @ b.T)
    expected = torch.autograd.grad((ref * w).sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_and_stock_dora_give_the_same_values(p, monkeypatch):
    """The speed layer's DoRA function against the stock autograd path on the same layer: the
    same output in eval mode, and in training the same output and gradients (x, A, B, m). The
    two paths draw their dropout masks differently (`lora_fn.keep_mask` against torch's
    dropout), so with p > 0 both are patched to apply one shared keep-mask."""
    from peftkit.fast import dora_fn

    layer = dora_layer(False, p)
    x = torch.randn(4, 8, requires_grad=True)
    keep = torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) >= p
    monkeypatch.setattr(dora_fn, "keep_mask", lambda shape, p_, device: keep.view(shape))
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda t, p_, training=True, inplace=False:
                        t * keep / (1 - p_) if training else t)
    w = torch.randn(4, 6)
    results = []
    for fused in (True, False):
        layer.use_lora_function = fused
        layer.zero_grad()
        x.grad = None
        layer.eval()
        with torch.no_grad():
            evaluated = layer(x)
        layer.train()
        trained = layer(x)
        (trained * w).sum().backward()
        grads = [x.grad] + [q.grad for q in layer.parameters() if q.requires_grad]
        results.append((evaluated, trained.detach(), grads))
    (fused_eval, fused_out, fused_grads), (eval_, out, grads) = results
    torch.testing.assert_close(fused_eval, eval_, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_out, out, rtol=1e-6, atol=1e-6)
    if p:
        assert not torch.allclose(fused_out, fused_eval)  # the mask did drop something
    assert len(fused_grads) == 4
    for g, e in zip(fused_grads, grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_training_gradients_equal_peft_with_trainable_bias(tokens, tmp_path):
    """One training step's gradients (dropout 0, bias="lora_only": the base bias trains and enters
    DoRA's base = y - bias) equal PEFT's, A, B, magnitude and bias."""
    ref = trained_peft("llama", tmp_path, bias="lora_only")
    ours = peftkit.PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    ref.train(), ours.train()
    g_ref, g_ours = grads(ref, tokens), grads(ours, tokens)
    assert g_ours.keys() == g_ref.keys()
    assert any(n.endswith("q_proj.base_layer.bias") for n in g_ours)
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], atol=1e-6, rtol=1e-4)


def test_dora_benchmark_times_every_variant(capsys):
    """benchmarks/dora_step.py on the tiny Llama: one row per variant with a step time."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import dora_step

    dora_step.main(["--model", "tiny-llama", "--batch", "2", "--seq", "16", "--rounds", "1",
                    "--memory-steps", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows[1:]] == list(dora_step.VARIANTS)
    assert all(float(r.split(" | ")[1]) > 0 for r in rows[1:])
