"""The LoRA autograd function and the fused loss compute what Hugging Face PEFT + transformers
compute: exactly with dropout 0, in distribution with dropout > 0."""

import copy

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.fast import loss as loss_module
from peftkit import models
from peftkit.fast.loss import causal_lm_loss
from peftkit.fast import lora_fn

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def pair(model, speed=True, **kw):
    """(peft model, peftkit model) over copies of `model` with identical adapter weights."""
    cfg = dict(r=16, lora_alpha=32, target_modules=QKVO)
    cfg.update(kw)
    ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    ours = peftkit.get_peft_model(model, peftkit.LoraConfig(**cfg), speed=speed)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(mine[name])
    return ref, ours


def batch(vocab=64, shape=(4, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, shape, generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    return ids, labels


def trajectory(model, loss_fn, steps=20):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("speed", [False, True])
def test_dropout0_trajectory_equals_peft(speed):
    """20 AdamW steps of `model(input_ids=..., labels=...).loss` from the same weights: every loss
    within 1e-4 relative of PEFT's (fp32 sums in another order differ by ~1e-7 relative per step;
    Adam can amplify that). `speed`: the model `get_peft_model` returns (fused loss, lean MLPs,
    LoRA function); otherwise the stock computation (`speed=False`)."""
    ref, ours = pair(models.tiny_llama(0), speed=speed)
    ids, labels = batch()
    expected = trajectory(ref.train(), lambda m: m(input_ids=ids, labels=labels).loss)
    got = trajectory(ours.train(), lambda m: m(input_ids=ids, labels=labels).loss)
    assert expected[0] - expected[-1] > 0.1  # it does train, far beyond the tolerance
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_bf16_base_fp32_adapters_match_peft():
    """A bf16 base with fp32 adapters: same outputs and adapter gradients as PEFT (the LoRA math
    runs in fp32 in both on the same bf16 base outputs, so at most the summation order of an
    fp32 matmul may differ: a few fp32 ulps; the observed difference is 0)."""
    ref, ours = pair(models.tiny_llama(0).to(torch.bfloat16), init_lora_weights=False)
    ids, labels = batch()
    grads = []
    for m in (ref, ours):
        loss = m.train()(input_ids=ids, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        assert all(g.dtype == torch.float32 for g in grads[-1].values())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype, layout", [(torch.float32, "contiguous"),
                                           (torch.float32, "transposed"),
                                           (torch.float64, "contiguous")])
def test_function_matches_closed_form_with_its_mask(dtype, layout):
    """Given the mask it drew, the function's output and every gradient equal autograd through
    the explicit formula y + s * ((x * keep / (1 - p)) @ A^T) @ B^T, up to rounding (the
    function applies 1 / (1 - p) after the matmul: values ~10, so ~1e-6 absolute in fp32).
    A transposed (non-contiguous) x goes through the numpy masking as a strided view."""
    torch.manual_seed(0)
    y = torch.randn(3, 5, 6, dtype=dtype, requires_grad=True)
    x = torch.randn(3, 5, 8, dtype=dtype)
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_(True)
    a = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    b = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    p, s = 0.3, 1.7
    torch.manual_seed(7)
    keep = lora_fn.keep_mask(torch.Size((15, 8)), p, x.device).view(3, 5, 8)
    torch.manual_seed(7)
    out = lora_fn.lora_forward(y, x, a, b, s, p)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (y, x, a, b))
    ref_out = y + s * ((x * keep / (1 - p)) @ a.T) @ b.T
    expected = torch.autograd.grad((ref_out * w).sum(), (y, x, a, b))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masking_paths_agree(dtype):
    """The numpy masking (fp32 on CPU) and the torch one (bf16 here; CUDA) give x * keep, as a
    new tensor in the requested dtype and in place. Reference: x where kept, 0 where dropped
    (built with torch.where, not a product), exact in either dtype."""
    x = torch.randn(64, 24).to(dtype)
    keep = torch.rand(64, 24) > 0.3
    expected = torch.where(keep, x, torch.zeros((), dtype=dtype))
    masked = lora_fn._masked(x, keep, torch.float32)
    assert masked.dtype == torch.float32 and torch.equal(masked, expected.float())
    masked = lora_fn._masked(x, keep, dtype)
    assert masked.dtype == dtype and torch.equal(masked, expected)
    t = x.clone()
    assert lora_fn._mask_(t, keep) is t and torch.equal(t, expected)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 24)

    def forward(self, x):
        return self.lin(x)


def grad_samples(model, x, w, n):
    """n draws of the flattened gradients (A, B, x) of sum(out * w), each with a fresh mask."""
    a = next(p for name, p in model.named_parameters() if "lora_A" in name)
    b = next(p for name, p in model.named_parameters() if "lora_B" in name)
    rows = []
    for _ in range(n):
        xi = x.clone().requires_grad_(True)
        ga, gb, gx = torch.autograd.grad((model(xi) * w).sum(), (a, b, xi))
        rows.append(torch.cat([ga.flatten(), gb.flatten(), gx.flatten()]))
    return torch.stack(rows)


def test_dropout_gradient_statistics_match_peft():
    """With dropout 0.1 each gradient element has the same mean and variance as under PEFT's
    nn.Dropout: over 600 draws per library, every |z| of the difference of means is < 5 (2,400
    elements: a false alarm has probability ~1e-3) and the summed variances agree within 10%
    (their sampling error is ~3%)."""
    torch.manual_seed(0)
    ref, ours = pair(Tiny(), r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["lin"],
                     init_lora_weights=False)
    x, w = torch.randn(16, 32), torch.randn(16, 24)
    ref_g = grad_samples(ref.train(), x, w, 600)
    our_g = grad_samples(ours.train(), x, w, 600)
    se = (ref_g.var(0) / 600 + our_g.var(0) / 600).sqrt()
    z = (our_g.mean(0) - ref_g.mean(0)) / se.clamp(min=1e-12)
    assert z.abs().max() < 5
    ratio = our_g.var(0).sum() / ref_g.var(0).sum()
    assert 0.9 < ratio < 1.1
    assert ref_g.var(0).sum() > 0  # dropout is really on in both


def test_eval_mode_has_no_dropout_and_matches_peft():
    torch.manual_seed(0)
    ref, ours = pair(Tiny(), r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["lin"],
                     init_lora_weights=False)
    x = torch.randn(16, 32)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.3, 12.5 / 256, 0.5 / 256])
def test_keep_mask_rate(p):
    """2,000,000 draws: the dropped fraction is p within 5 binomial standard errors. At
    p = 12.5/256 half the draws whose top byte ties with p's are dropped; deciding every tie the
    same way would move the rate by 1/512 (13 standard errors); at 0.5/256 every drop is a tie."""
    keep = lora_fn.keep_mask(torch.Size((2000, 1000)), p, "cpu")
    se = (p * (1 - p) / keep.numel()) ** 0.5
    assert keep.dtype == torch.bool and keep.shape == (2000, 1000)
    assert abs(1 - keep.float().mean().item() - p) < 5 * se


def test_keep_mask_follows_torch_seed():
    shape = torch.Size((3, 1001))
    torch.manual_seed(3)
    first = lora_fn.keep_mask(shape, 0.1, "cpu")
    torch.manual_seed(3)
    assert torch.equal(lora_fn.keep_mask(shape, 0.1, "cpu"), first)
    assert not torch.equal(lora_fn.keep_mask(shape, 0.1, "cpu"), first)


@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_bit_packing_round_trips(n):
    mask = torch.rand(n) > 0.5
    shape = torch.Size((n,))
    packed = lora_fn.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(lora_fn.unpack_bits(packed, shape), mask)
    torch_packed = lora_fn._pack_bits_torch(mask)  # the path other devices take
    assert torch.equal(torch_packed, packed)
    assert torch.equal(lora_fn._unpack_bits_torch(torch_packed, shape), mask)


def test_fused_loss_matches_transformers_with_trainable_head():
    """Same loss and gradients as model(...).loss with a trainable (untied) lm_head and
    num_items_in_batch; chunks of 5 tokens do not divide the 3 x 9 batch."""
    model = peftkit.get_peft_model(models.tiny_llama(0), peftkit.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
        speed=False)
    ids, labels = batch(shape=(3, 9))
    results = []
    for fn in (lambda: model(input_ids=ids, labels=labels, num_items_in_batch=20).loss,
               lambda: causal_lm_loss(model, ids, labels, num_items_in_batch=20, chunk_size=5)):
        loss = fn()
        loss.backward()
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad}))
        model.zero_grad()
    assert any("lm_head" in n for n in results[0][1])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-7)


def test_fused_loss_scores_only_the_counted_tokens(monkeypatch):
    """Logits are computed for the tokens that count and no other (a masked prompt costs
    nothing); the loss and gradients are still transformers'."""
    model = peftkit.get_peft_model(models.tiny_llama(0), peftkit.LoraConfig(
        r=4, target_modules=QKVO, init_lora_weights=False), speed=False)
    ids, labels = batch(shape=(3, 9))
    labels[:, :6] = -100  # 3 scored labels a row, predicted from positions 5-7
    rows = []
    real = loss_module._logits_into
    monkeypatch.setattr(loss_module, "_logits_into",
                        lambda out, h, *a: rows.append(h.shape[0]) or real(out, h, *a))
    results = []
    for fn in (lambda: model(input_ids=ids, labels=labels).loss,
               lambda: causal_lm_loss(model, ids, labels, chunk_size=4)):
        loss = fn()
        loss.backward()
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        model.zero_grad()
    assert rows == [4, 4, 1]  # 3 rows x 3 scored tokens, in chunks of 4
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    rows.clear()
    causal_lm_loss(model, ids, torch.full_like(labels, -100)).backward()
    assert rows == []  # no counted token: no logits (values: test_no_counted_token_as_stock)


def test_fused_loss_is_as_accurate_as_the_stock_loss():
    """Against the float64 loss and gradients, the fused fp32 loss (softmax formed in place as
    exp(z - max) / sum) errs no more than fp32 cross_entropy on full logits does: 5,000 classes,
    chunks of 100 rows that do not divide 512, ignored rows."""
    from peftkit.fast.loss import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 64, generator=g, dtype=torch.float64)
    weight = torch.randn(5000, 64, generator=g, dtype=torch.float64) * 0.3
    target = torch.randint(0, 5000, (512,), generator=g)
    target[:50] = -100
    stock = lambda h, w: nn.functional.cross_entropy(h @ w.t(), target)  # noqa: E731
    fused = lambda h, w: LinearCrossEntropy.apply(  # noqa: E731
        h, w, None, target, (target != -100).sum().to(h.dtype), 100)

    def loss_and_grads(fn, dtype):
        h, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
        loss = fn(h, w)
        loss.backward()
        return [t.detach().double() for t in (loss, h.grad, w.grad)]

    exact = loss_and_grads(stock, torch.float64)
    errors = [[((a - b).norm() / b.norm()).item()
               for a, b in zip(loss_and_grads(fn, torch.float32), exact)] for fn in (stock, fused)]
    for stock_err, fused_err in zip(*errors):
        assert fused_err <= 1.5 * stock_err + 1e-9, errors


@pytest.mark.parametrize("num_items_in_batch", [None, 7, torch.tensor(7), 0])
def test_no_counted_token_as_stock(num_items_in_batch):
    """A batch whose labels are all -100: the loss the stock model gives (nan for the mean, 0 with
    `num_items_in_batch`, nan for 0 / 0), and its gradients (zeros), through `model(...)`."""
    kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    results = []
    for speed in (False, True):
        model = peftkit.get_peft_model(models.tiny_llama(0), peftkit.LoraConfig(
            r=4, target_modules=QKVO, init_lora_weights=False), speed=speed).train()
        ids, labels = batch(shape=(3, 9))
        out = model(input_ids=ids, labels=torch.full_like(labels, -100), **kw)
        assert (out.logits is None) == speed  # the fused path ran
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (stock, stock_grads), (fused, fused_grads) = results
    assert stock.isnan().item() == (num_items_in_batch is None or num_items_in_batch == 0)
    torch.testing.assert_close(fused, stock, rtol=0, atol=0, equal_nan=True)
    for got, expected in zip(fused_grads, stock_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_fused_loss_refuses_second_derivatives():
    """Its backward uses gradients saved in the forward pass, constants to autograd: asked for a
    graph of its gradient (for a second derivative) it raises instead of silently missing the
    cross-entropy's Hessian. The LoRA and DoRA functions and the lean SwiGLU likewise."""
    from peftkit.fast.loss import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(10, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 10, (6,), generator=g)
    loss = LinearCrossEntropy.apply(hidden, weight, None, target, torch.tensor(6.0), 4)
    loss = loss + hidden.pow(2).sum()  # a term whose second derivative autograd has
    with pytest.raises(RuntimeError, match="LinearCrossEntropy .* has no second derivative"):
        (grad_h,) = torch.autograd.grad(loss, hidden, create_graph=True)
        torch.autograd.grad(grad_h.sum(), hidden)  # before: 2 everywhere, the CE term missing
    (grad_h,) = torch.autograd.grad(loss, hidden)  # the first derivative is the stock one
    stock = nn.functional.cross_entropy(hidden @ weight.t(), target) + hidden.pow(2).sum()
    torch.testing.assert_close(grad_h, torch.autograd.grad(stock, hidden)[0])
    a, b = torch.randn(2, 8, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    out = lora_fn.lora_forward(torch.zeros(6, 3), hidden, a, b, 2.0, 0.0)
    with pytest.raises(RuntimeError, match="LoraFunction .* has no second derivative"):
        torch.autograd.grad(out.pow(2).sum(), a, create_graph=True)
    from peftkit.fast.swiglu import SiluMul

    with pytest.raises(RuntimeError, match="SiluMul .* has no second derivative"):
        torch.autograd.grad(SiluMul.apply(a, a).sum(), a, create_graph=True)
    from peftkit.fast.dora_fn import dora_forward

    # The incoming gradient (ones) needs no grad, so torch's once_differentiable let it through.
    m, norm = torch.rand(3, requires_grad=True), torch.rand(3) + 1
    out = dora_forward(torch.randn(6, 3), hidden, a, b, m, norm, None, None, 2.0, 0.0)
    with pytest.raises(RuntimeError, match="DoraFunction .* has no second derivative"):
        torch.autograd.grad(out.sum(), hidden, create_graph=True)


@pytest.mark.parametrize("model_type, attr, value", [
    ("gemma2", "final_logit_softcapping", 3.0),
    ("llama", "final_logit_softcapping", 3.0),
    ("llama", "logit_scale", 0.5),
    ("llama", "logits_scaling", 2.0)])
def test_logit_transforms_take_the_stock_forward(model_type, attr, value):
    """A config that transforms the logits after the head (Gemma2's softcapping, Cohere's
    logit_scale, Granite's logits_scaling) is not fused: `model(..., labels=...)` in training
    runs the model's own forward and gives the stock model's loss and logits."""
    model = tiny_causal_lm(model_type)
    setattr(model.config, attr, value)
    assert not loss_module.fusable(model)
    ids, labels = batch(shape=(3, 9))
    results = []
    for speed in (False, True):
        torch.manual_seed(0)  # the same adapter weights
        peft_model = peftkit.get_peft_model(copy.deepcopy(model), peftkit.LoraConfig(
            r=4, target_modules=QKVO, init_lora_weights=False), speed=speed).train()
        out = peft_model(input_ids=ids, labels=labels)
        assert out.logits is not None
        results.append(out.loss)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=0)


def test_fused_loss_refuses_logit_softcapping():
    model = models.tiny_llama(0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_loss(model, *batch())


def tiny_causal_lm(model_type):
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    if model_type == "gpt2":
        kw = dict(n_embd=16, n_layer=2, n_head=2, n_positions=64)
    else:
        kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    config = CONFIG_MAPPING[model_type](vocab_size=64, pad_token_id=0, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", loss_module.FUSABLE_MODEL_TYPES)
def test_fusable_model_types_match_transformers(model_type):
    """Each model type `fusable` accepts: the fused loss and its gradients equal
    model(..., labels=...).loss's on a right-padded batch, in training mode."""
    model = tiny_causal_lm(model_type).train()
    assert loss_module.fusable(model)
    ids, labels = batch(shape=(3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:], labels[1, 6:] = 0, -100
    results = []
    for fn in (lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
               lambda: causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=5)):
        torch.manual_seed(1)  # GPT-2 has dropout; both calls draw the same masks
        loss = fn()
        loss.backward()
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_fusable_refuses_what_it_cannot_reproduce():
    """No fusing for an unlisted model type, an adapted output head, a custom loss function or
    an active prompt-tuning adapter; a modules_to_save copy of the head is fine."""
    assert not loss_module.fusable(tiny_causal_lm("gemma2"))  # final_logit_softcapping
    lm_head = dict(r=4, target_modules=["q_proj", "lm_head"])
    assert not loss_module.fusable(peftkit.get_peft_model(models.tiny_llama(0),
                                                          peftkit.LoraConfig(**lm_head)))
    saved = peftkit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert loss_module.fusable(peftkit.get_peft_model(models.tiny_llama(0), saved))
    custom = models.tiny_llama(0)
    custom.loss_function = lambda *a, **kw: 0.0
    assert not loss_module.fusable(custom)
    prompt = peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    assert not loss_module.fusable(peftkit.get_peft_model(models.tiny_llama(0), prompt))
