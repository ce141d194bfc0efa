"""QLoRA on tiny k-bit Llamas (hidden 64): interop with peft + bitsandbytes, merging, the
prepare step, training in transformers' Trainer, and errors."""

import contextlib
import copy
import io
import os
import sys

import bitsandbytes as bnb
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peftkit
from conftest import logits
from peftkit import models, quant
from peftkit.methods.qlora import KbitLoraLinear

KINDS = {  # name -> BitsAndBytesConfig kwargs
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]
_LOADED = {}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Every linear's in_features a multiple of the 4-bit block size (64): on AVX512 CPUs
    bitsandbytes 0.50's native dequantization (matmul included) reads the wrong block scales
    for rows of 32 or 96 weights, and its packed AVX512-BF16 format cannot hold them at all."""
    path = tmp_path_factory.mktemp("tiny-llama")
    models.tiny_llama(0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def load(base_dir, kind="nf4_dq", compute=torch.float32, dtype=torch.float32):
    """A fresh copy of the tiny Llama loaded in k-bit by transformers (quantized once per
    setting; bitsandbytes quantizes deterministically, so copies hold the same codes).

    Kept off bitsandbytes' packed CPU format (entered on AVX512-BF16 CPUs), as peftkit's loaders
    keep theirs, so the results below do not depend on the CPU; tests/test_kbit.py covers the
    packed path."""
    key = (str(base_dir), kind, compute, dtype)
    if key not in _LOADED:
        cfg = dict(KINDS[kind])
        if "load_in_4bit" in cfg:
            cfg["bnb_4bit_compute_dtype"] = compute
        _LOADED[key] = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=BitsAndBytesConfig(**cfg), device_map="cpu", dtype=dtype
        ).eval()
    return quant.avoid_cpu_packing_(copy.deepcopy(_LOADED[key]))


def lora_kw(**kw):
    return dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), **kw)


def trained(model, seed=5, **kw):
    """peftkit model whose A and B are random (as after training)."""
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(**lora_kw(**kw))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_tensors("default").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def kbit_layers(model):
    return {n: m for n, m in model.named_modules() if quant.kbit_kind(m)}


# -- interop with peft on the same k-bit base ----------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_files_cross_both_ways_same_logits(kind, base_dir, tokens, tmp_path):
    """peft saves -> peftkit loads -> peftkit saves -> peft loads; logits equal throughout.

    Both libraries call the same bitsandbytes layer on the same codes and run the LoRA branch as
    fp32 linears, so only summation order could differ; 1e-4 relative is the issue's bound and
    the observed difference is 0."""
    ref = peft.get_peft_model(load(base_dir, kind), peft.LoraConfig(**lora_kw())).eval()
    ref.save_pretrained(tmp_path / "peft")
    expected = logits(ref, tokens)
    assert (expected - logits(load(base_dir, kind), tokens)).abs().max() > 1e-3
    ours = peftkit.PeftModel.from_pretrained(load(base_dir, kind), tmp_path / "peft").eval()
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, KbitLoraLinear)
    torch.testing.assert_close(logits(ours, tokens), expected, rtol=1e-4, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load(base_dir, kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, tokens), expected, rtol=1e-4, atol=1e-6)


def test_bf16_compute_matches_peft(base_dir, tokens, tmp_path):
    """bf16 matmuls in the base, fp32 LoRA. PEFT rounds the LoRA output to bf16 and then the sum;
    peftkit sums in fp32 and rounds once, so they differ by bf16 rounding, once per adapted layer
    on the path: within two bf16 steps (2 * 2^-7 of the largest logit) on this 2-layer model."""
    ref = peft.get_peft_model(load(base_dir, compute=torch.bfloat16, dtype=torch.bfloat16),
                              peft.LoraConfig(**lora_kw())).eval()
    ref.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(
        load(base_dir, compute=torch.bfloat16, dtype=torch.bfloat16), tmp_path).eval()
    expected = logits(ref, tokens)
    assert expected.dtype == torch.bfloat16
    step = 2 ** -7 * expected.abs().max().item()
    torch.testing.assert_close(logits(ours, tokens), expected, rtol=0, atol=2 * step)


@pytest.mark.parametrize("kind", ["nf4_dq", "int8"])
def test_trainable_line_matches_peft(kind, base_dir):
    """A packed 4-bit tensor counts the weights it holds (2 per byte), as in PEFT."""
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.05,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lines, counts = [], []
    for lib in (peft, peftkit):
        model = lib.get_peft_model(load(base_dir, kind), lib.LoraConfig(**kw))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.print_trainable_parameters()
        lines.append(buf.getvalue())
        counts.append(model.get_nb_trainable_parameters())
    assert lines[0] == lines[1]
    full = sum(p.numel() for p in models.tiny_llama(0, hidden_size=64, intermediate_size=128)
               .parameters())
    trainable, total = counts[1]
    assert total == full + trainable


@pytest.mark.parametrize("autocast, want", [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_and_output_dtype(autocast, want, base_dir, tokens):
    model = load(base_dir, compute=torch.bfloat16, dtype=torch.bfloat16)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(**lora_kw()),
                                autocast_adapter_dtype=autocast)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == want
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == layer.base_layer(x).dtype == torch.bfloat16


# -- merging ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4_dq", "fp4", "int8"])
def test_dequantized_merge_is_exact_and_loads_in_transformers(kind, base_dir, tokens, tmp_path):
    """Dequantizing gives the very weights the k-bit matmul uses, so the merged fp32 model
    matches the unmerged k-bit + LoRA forward up to fp32 summation order. (LLM.int8 also rounds
    the activations to fp16 and int8 rows, which the fp32 model does not: int8's looser bound.)"""
    pm = trained(load(base_dir, kind))
    expected = logits(pm, tokens)
    merged = pm.merge_and_unload(dequantize=True)
    assert not kbit_layers(merged) and getattr(merged, "hf_quantizer", None) is None
    tol = 2e-2 if kind == "int8" else 1e-5
    torch.testing.assert_close(logits(merged, tokens), expected, rtol=0, atol=tol)
    merged.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(plain.config, "quantization_config", None) is None
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(plain, tokens), logits(merged, tokens), rtol=0, atol=0)


def stored_absmax(state):
    if state.nested:
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


@pytest.mark.parametrize("kind", ["nf4_dq", "nf4", "fp4_dq", "fp4"])
def test_requantized_merge_bound(kind, base_dir, tokens):
    """merge_and_unload() on 4-bit warns and stores quant(W0 + delta); each weight is within
    half the widest codebook gap times its block's absmax (plus the stored absmax's own
    rounding under double quantization) of the exact sum."""
    pm = trained(load(base_dir, kind))
    exact = {}
    for name, layer in pm.named_modules():
        if isinstance(layer, KbitLoraLinear):
            path = name.removeprefix("base_model.model.")
            exact[path] = quant.dequantize_weight(layer.base_layer) + layer.delta_weight("default")
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = pm.merge_and_unload()
    code = bnb.functional.get_4bit_type(KINDS[kind]["bnb_4bit_quant_type"], device="cpu")
    half_gap = code.sort().values.diff().max().item() / 2
    for path, w in exact.items():
        layer = merged.get_submodule(path)
        state = layer.weight.quant_state
        err = (quant.dequantize_weight(layer) - w).abs().reshape(-1, state.blocksize)
        absmax = w.abs().reshape(-1, state.blocksize).amax(dim=1, keepdim=True)
        absmax_err = (stored_absmax(state).reshape(-1, 1) - absmax).abs()
        assert (err <= half_gap * absmax + absmax_err + 1e-6).all(), path
        assert (err.amax() > 0).item()  # it really was re-quantized


def test_merge_twice_warns_and_unmerge_restores_within_bound(base_dir, tokens):
    pm = trained(load(base_dir))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    w0 = quant.dequantize_weight(layer.base_layer)
    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.merge_adapter()
    once = quant.dequantize_weight(layer.base_layer)
    with pytest.warns(UserWarning, match="already merged"):
        pm.merge_adapter()
    torch.testing.assert_close(quant.dequantize_weight(layer.base_layer), once, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="unmerging"):
        pm.unmerge_adapter()
    assert layer.merged_adapters == []
    # two re-quantizations: within twice the NF4 half gap of the block absmax of the original
    scale = (w0.abs().max() + layer.delta_weight("default").abs().max()).item()
    assert (quant.dequantize_weight(layer.base_layer) - w0).abs().max() <= 2 * 0.152 * scale


# -- prepare_model_for_kbit_training ------------------------------------------------------------
@pytest.mark.parametrize("upcast", ["norms", "all", "none"])
def test_prepare_upcasts_what_it_says(upcast, base_dir):
    model = load(base_dir, compute=torch.bfloat16, dtype=torch.bfloat16)
    packed = {n: p.data.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    out = peftkit.prepare_model_for_kbit_training(model, upcast=upcast)
    assert out is model and not any(p.requires_grad for p in model.parameters())
    norm = model.model.layers[0].input_layernorm.weight.dtype
    embed = model.model.embed_tokens.weight.dtype
    head = model.lm_head.weight.dtype
    want = {"norms": (torch.float32, torch.bfloat16), "all": (torch.float32, torch.float32),
            "none": (torch.bfloat16, torch.bfloat16)}[upcast]
    assert (norm, embed) == want and head == embed
    for n, p in model.named_parameters():
        if n in packed:
            assert type(p).__name__ == "Params4bit" and torch.equal(p.data, packed[n])
    assert model.is_activation_checkpointing
    emb_out = model.get_input_embeddings()(torch.tensor([[3, 4]]))
    assert emb_out.requires_grad
    # the unquantized lm_head gets its own dtype's input; activations keep the model's dtype
    norm_out = model.model.norm(torch.randn(1, 2, 64, dtype=torch.bfloat16))
    assert norm_out.dtype == (torch.float32 if upcast == "all" else torch.bfloat16)
    out = model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]]))
    assert out.logits.dtype == head and torch.isfinite(out.loss)


def test_fp32_norm_matches_an_fp32_computation():
    """With upcast="norms" a bf16 RMSNorm returns the fp32 norm of its input, rounded once."""
    model = models.tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    xf, w = x.float(), norm.weight.detach().float()
    expected = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * w
    peftkit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.testing.assert_close(norm(x), expected.to(torch.bfloat16), rtol=0, atol=0)


def test_prepare_rejects_bad_upcast_and_warns_without_checkpointing():
    """A model without gradient checkpointing is prepared without it, with a warning (PEFT
    skips it silently)."""
    with pytest.raises(ValueError, match="upcast"):
        peftkit.prepare_model_for_kbit_training(models.tiny_llama(), upcast="embeddings")
    linear = torch.nn.Linear(4, 4)
    with pytest.warns(UserWarning, match="does not support gradient checkpointing"):
        assert peftkit.prepare_model_for_kbit_training(linear) is linear
    assert not linear.weight.requires_grad


def lora_grads(model, tokens):
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(base_dir, tokens):
    """Recomputing the blocks repeats the same fp32 ops in the same order: equal gradients."""
    grads = []
    for use_gc in (False, True):
        model = peftkit.prepare_model_for_kbit_training(load(base_dir),
                                                        use_gradient_checkpointing=use_gc)
        pm = trained(model).train()
        assert pm.is_activation_checkpointing == use_gc
        grads.append(lora_grads(pm, tokens))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * len(TARGETS)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8)


# -- training -----------------------------------------------------------------------------------
def test_seed_recipe_trains_in_trainer(base_dir, tokens, tmp_path):
    """The seed's recipe with only the import changed; Trainer steps lower the loss, change only
    the LoRA tensors, and leave the 4-bit codes and scales bit-for-bit unchanged."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config,
                                                 device_map="cpu")
    model = peftkit.prepare_model_for_kbit_training(model)
    lora_config = peftkit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = peftkit.get_peft_model(model, lora_config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {n: m.weight.quant_state.absmax.clone() for n, m in kbit_layers(model).items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(2)).repeat(4, 1)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.1, losses

    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), n
    for n, m in kbit_layers(model).items():
        assert torch.equal(m.weight.quant_state.absmax, states[n]), n
    # Default checkpointing: the 4-bit base's checkpoint is the adapter alone, in PEFT's layout.
    files = set(os.listdir(tmp_path / "checkpoint-5"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "config.json"}


# -- errors -------------------------------------------------------------------------------------
def test_missing_bitsandbytes_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install 'peftkit\\[quant\\]'"):
        models.load_default(quantize="nf4")
    with pytest.raises(ImportError, match="bitsandbytes"):
        quant.dequantize_weight(torch.nn.Linear(4, 4))


def test_bad_quant_type_and_non_kbit_layer():
    with pytest.raises(ValueError, match="quantize='nf3'"):
        quant.bnb_config("nf3")
    with pytest.raises(TypeError, match="not a bitsandbytes"):
        quant.dequantize_weight(torch.nn.Linear(4, 4))


def test_weight_bytes_counts_codes_and_scales(base_dir):
    """fp32 linears are 4 bytes a weight; nf4 half a byte plus one absmax per 64 weights."""
    full = models.tiny_llama(0, hidden_size=64, intermediate_size=128)
    packed = load(base_dir, "nf4")
    n_lin = sum(m.weight.numel() for m in full.modules() if type(m) is torch.nn.Linear
                and m is not full.lm_head)
    saved = quant.weight_bytes(full) - quant.weight_bytes(packed)
    code_bytes = 16 * 4 * len(kbit_layers(packed))  # one 16-entry fp32 codebook per layer
    assert saved == n_lin * 4 - (n_lin // 2 + n_lin // 64 * 4 + code_bytes)


# -- LoftQ-style initialisation -----------------------------------------------------------------
def test_loftq_init_moves_the_4bit_model_towards_full_precision(base_dir, tokens):
    """A, B from the SVD of W - dequant(Q): per layer the residual shrinks to the norm of the
    discarded singular values (checked against an independent recomputation), and the logits
    move towards the full-precision model's."""
    from peftkit.methods.loftq import loftq_init

    full = models.tiny_llama(0, hidden_size=64, intermediate_size=128)
    pm = peftkit.get_peft_model(load(base_dir), peftkit.LoraConfig(r=16, lora_alpha=32,
                                                                   target_modules="all-linear"))
    gap_before = (logits(pm, tokens) - logits(full, tokens)).norm()
    report = loftq_init(pm, full)
    assert len(report) == 2 * 7
    for path, (before, after) in report.items():
        layer = pm.base_model.model.get_submodule(path)
        w = full.get_submodule(path).weight.detach()
        residual = w - quant.dequantize_weight(layer.base_layer)
        tail = torch.linalg.svdvals(residual)[16:].norm()
        left = (residual - layer.delta_weight("default")).norm()
        torch.testing.assert_close(left, tail, rtol=1e-4, atol=1e-6)
        assert abs(left.item() - after) < 1e-4 * before and after < before
    gap_after = (logits(pm, tokens) - logits(full, tokens)).norm()
    print(f"logit gap to fp32: {gap_before:.4f} -> {gap_after:.4f}")
    assert gap_after < 0.7 * gap_before  # 0.55 measured (r = 16 of 64)


def test_loftq_init_errors(base_dir):
    from peftkit.methods.loftq import loftq_init

    pm = peftkit.get_peft_model(load(base_dir), peftkit.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(KeyError, match="q_proj.weight"):
        loftq_init(pm, {})
    plain = peftkit.get_peft_model(models.tiny_llama(),
                                   peftkit.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="k-bit base"):
        loftq_init(plain, models.tiny_llama())


def test_weight_bytes_counts_int8_row_scales(base_dir):
    """int8: one byte a weight plus one fp32 scale per output row."""
    full = models.tiny_llama(0, hidden_size=64, intermediate_size=128)
    packed = load(base_dir, "int8")
    lin = [m for n, m in full.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    n_lin, rows = sum(m.weight.numel() for m in lin), sum(m.out_features for m in lin)
    assert quant.weight_bytes(full) - quant.weight_bytes(packed) == n_lin * 4 - n_lin - rows * 4


def test_lora_branch_follows_autocast(base_dir):
    """Under autocast (bf16) the input is left to autocast, as in PEFT on GPU: the layer returns
    the base output's dtype, the LoRA branch is autocast's bf16 arithmetic and is added to the
    base output in that output's dtype (PEFT: `result + output`), reproduced here op by op
    outside autocast (same kernels, same dtypes: equal)."""
    layer = trained(load(base_dir)).base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    a, b = (w.weight.detach().bfloat16() for w in (layer.lora_A["default"],
                                                    layer.lora_B["default"]))
    with torch.no_grad():
        full = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
            y = layer.base_layer(x)
    expected = y.add((x.bfloat16() @ a.t()) @ b.t(), alpha=layer.scaling["default"])
    assert mixed.dtype == full.dtype == torch.float32 and not torch.equal(mixed, full)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)


# -- QDoRA: DoRA over a k-bit base ---------------------------------------------------------------
def dora_kw(**kw):
    return lora_kw(use_dora=True, **kw)


def peft_qdora(base_dir, kind, path):
    """A PEFT DoRA model on the k-bit base, every adapter tensor moved off its init, saved."""
    ref = peft.get_peft_model(load(base_dir, kind), peft.LoraConfig(**dora_kw()))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("kind", ["nf4_dq", "fp4", "int8"])
def test_qdora_init_files_logits_and_gradients_match_peft(kind, base_dir, tokens, tmp_path):
    """DoRA on a k-bit base: m starts at the row norm of the dequantized W0 as in PEFT; PEFT's
    files load in peftkit and back with the same logits, and the gradients are PEFT's.

    bitsandbytes dequantizes deterministically (same codes, same fp32 weights) and both libraries
    take the norm from that weight and run the same fp32 expression; only the order of fp32 sums
    differs (B @ A vs B(A(I))^T, one fused multiply-add): 1e-5 on logits of order 1, as in
    tests/test_dora.py (observed: ~2e-7). The layers are kept off bitsandbytes' packed CPU
    format (`load`), on both libraries' models, so AVX512-BF16 CPUs compute the same."""
    init = {}
    for lib in (peft, peftkit):
        model = lib.get_peft_model(load(base_dir, kind), lib.LoraConfig(**dora_kw(
            init_lora_weights=True)))
        init[lib] = {n: p.detach() for n, p in model.named_parameters() if "magnitude" in n}
    assert init[peft].keys() == init[peftkit].keys() and init[peft]
    for n in init[peft]:
        torch.testing.assert_close(init[peftkit][n], init[peft][n], rtol=1e-6, atol=0)

    ref = peft_qdora(base_dir, kind, tmp_path / "peft").eval()
    expected = logits(ref, tokens)
    assert (expected - logits(load(base_dir, kind), tokens)).abs().max() > 1e-2
    ours = peftkit.PeftModel.from_pretrained(load(base_dir, kind), tmp_path / "peft",
                                             is_trainable=True).eval()
    assert isinstance(ours.base_model.model.model.layers[0].self_attn.q_proj, KbitLoraLinear)
    torch.testing.assert_close(logits(ours, tokens), expected, rtol=0, atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load(base_dir, kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, tokens), expected, rtol=0, atol=1e-5)

    ref.train(), ours.train()  # dropout 0: training mode takes W0 x from the base output
    g_ours = lora_grads(ours, tokens)
    assert len(g_ours) == 3 * 2 * len(TARGETS)
    if kind == "int8":  # PEFT's int8 backward fails in bitsandbytes 0.50 on CPU (SCB is None)
        return
    g_ref = lora_grads(ref, tokens)
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6)


def test_qdora_trains_only_a_b_and_the_magnitude(base_dir, tokens):
    """prepare + DoRA on nf4 with dropout: gradients reach exactly A, B and m of every adapted
    layer; AdamW steps lower the loss and leave the 4-bit codes and scales unchanged."""
    model = peftkit.prepare_model_for_kbit_training(load(base_dir))
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(**dora_kw(
        lora_dropout=0.1, init_lora_weights=True))).train()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-3] in ("lora_A", "lora_B", "lora_magnitude_vector")
                             for n in trainable)
    assert len(trainable) == 3 * 2 * len(TARGETS)
    codes = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
             for n, m in kbit_layers(pm).items()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = pm(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
            assert with_grad == trainable
            assert all(pm.get_parameter(n).grad.abs().sum() > 0 for n in trainable
                       if ".lora_A." not in n)  # B = 0 at init: A's gradient is 0 at step 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, m in kbit_layers(pm).items():
        assert torch.equal(m.weight.data, codes[n][0])
        assert torch.equal(m.weight.quant_state.absmax, codes[n][1])


@pytest.mark.parametrize("kind", ["nf4_dq", "fp4"])
def test_qdora_merge_requantizes_as_peft_does(kind, base_dir, tokens, tmp_path):
    """PEFT merges DoRA into a 4-bit layer by dequantizing, scaling W0 + delta by m / norm and
    re-quantizing; peftkit does the same (warning): the merged 4-bit codes and scales are PEFT's,
    and the merged model's logits PEFT's merged model's. The exact route stays
    merge_and_unload(dequantize=True): within fp32 rounding of the unmerged model."""
    ref = peft_qdora(base_dir, kind, tmp_path)
    ours = peftkit.PeftModel.from_pretrained(load(base_dir, kind), tmp_path).eval()
    expected = logits(ours, tokens)
    with pytest.warns(UserWarning):
        merged_ref = ref.merge_and_unload()
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = ours.merge_and_unload()
    for n, m in kbit_layers(merged_ref).items():
        mine = merged.get_submodule(n)
        torch.testing.assert_close(quant.dequantize_weight(mine), quant.dequantize_weight(m),
                                   rtol=0, atol=0)
    torch.testing.assert_close(logits(merged, tokens), logits(merged_ref.eval(), tokens),
                               rtol=0, atol=1e-5)
    exact = peftkit.PeftModel.from_pretrained(load(base_dir, kind), tmp_path)
    exact = exact.merge_and_unload(dequantize=True)
    assert not kbit_layers(exact)
    torch.testing.assert_close(logits(exact, tokens), expected, rtol=0, atol=1e-5)
