"""Every method over a bitsandbytes k-bit base, bitsandbytes' packed CPU format, and the device a
k-bit model loads on.

The packed format (see `peftkit.quant`) is entered only on CPUs with AVX512-BF16; these tests
reach its conversion on any CPU by setting the module flag bitsandbytes reads
(`support_avx512bf16_for_cpu`). The conversion is plain torch code; the forward that follows
runs the packed kernel only where it exists, so its output is never checked here.
"""

import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peftkit
from conftest import logits, perturb_trainable
from peftkit import models, quant
from peftkit.methods.loftq import loftq_init
from peftkit.methods.qlora import KbitLoraLinear
from peftkit.train import loading

KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
_LOADED = {}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama whose every linear can be CPU-packed: in_features multiples of the block size
    (64), out_features multiples of 32 (k/v: 2 heads of 16)."""
    path = tmp_path_factory.mktemp("tiny-llama-64")
    models.tiny_llama(0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def load(base_dir, kind="nf4"):
    if kind not in _LOADED:
        _LOADED[kind] = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=BitsAndBytesConfig(**KINDS[kind]), device_map="cpu",
            dtype=torch.float32).eval()
    return quant.avoid_cpu_packing_(copy.deepcopy(_LOADED[kind]))


# -- every method over a k-bit base -------------------------------------------------------------
CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3": lambda: peftkit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]),
    "adapter": lambda: peftkit.AdapterConfig(reduction_factor=8),
    "prompt": lambda: peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", list(CONFIGS))
def test_method_over_kbit_base(method, kind, base_dir, tokens, tmp_path):
    """Injection leaves the k-bit layers and their codes as they were, the model unchanged at
    init (prompt tuning adds tokens, so there only the shape is checked), gradients reach every
    (perturbed) adapter tensor and nothing else, and saved files load back onto a fresh k-bit base with the
    same logits (the same ops on the same codes: equal)."""
    base = load(base_dir, kind)
    codes = {n: p.detach().clone() for n, p in base.named_parameters()
             if not p.is_floating_point()}
    expected = logits(base, tokens)
    pm = peftkit.get_peft_model(base, CONFIGS[method]())
    assert {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in pm.named_parameters() if not p.is_floating_point()}.keys() == codes.keys()
    out = logits(pm, tokens)
    if method == "prompt":
        assert out.shape == (2, 3 + tokens.shape[1], expected.shape[2])  # 3 virtual tokens
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    perturb_trainable(pm, scale=0.3)  # LoRA's A gets no gradient while B = 0
    pm.train()
    pm(input_ids=tokens, labels=tokens).loss.backward()
    adapter = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert adapter == {n for n, p in pm.named_parameters() if p.grad is not None}
    assert all(p.grad.abs().sum() > 0 for p in pm.parameters() if p.grad is not None)
    for name, p in pm.named_parameters():
        if not p.is_floating_point():
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, codes[key]), name

    pm.eval().save_pretrained(tmp_path)
    back = peftkit.PeftModel.from_pretrained(load(base_dir, kind), tmp_path)
    torch.testing.assert_close(logits(back, tokens), logits(pm, tokens), rtol=0, atol=0)


def ia3_model(base_dir, kind):
    return perturb_trainable(peftkit.get_peft_model(load(base_dir, kind), CONFIGS["ia3"]()),
                             scale=0.3)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ia3_vectors_have_the_layer_shape_and_match_peft(kind, base_dir, tokens, tmp_path):
    """(IA)^3 reads in/out features from the layer, not from the packed weight, and computes
    what PEFT's k-bit (IA)^3 layers compute (the same scalings around the same bitsandbytes
    call; the observed difference is 0, 1e-6 leaves room for summation order)."""
    pm = ia3_model(base_dir, kind)
    mlp = pm.base_model.model.model.layers[0].mlp
    attn = pm.base_model.model.model.layers[0].self_attn
    assert mlp.down_proj.ia3_l["default"].shape == (1, 128)
    assert attn.v_proj.ia3_l["default"].shape == (32, 1)
    pm.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(load(base_dir, kind), tmp_path).eval()
    torch.testing.assert_close(logits(ref, tokens), logits(pm, tokens), rtol=0, atol=1e-6)


def requantized_reference(layer, weight):
    """What bitsandbytes stores for `weight` (out, in) with `layer`'s settings, dequantized."""
    if quant.kbit_kind(layer) == "8bit":
        codes, scb, _ = bnb.functional.int8_vectorwise_quant(weight.half())
        return bnb.functional.int8_vectorwise_dequant(codes, scb)
    state = layer.weight.quant_state
    codes, new = bnb.functional.quantize_4bit(weight.to(state.dtype), blocksize=state.blocksize,
                                              compress_statistics=state.nested,
                                              quant_type=state.quant_type)
    return bnb.functional.dequantize_4bit(codes, new)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ia3_merge_into_kbit_requantizes_the_scaled_weight(kind, base_dir):
    """merge_adapter() stores bitsandbytes' own quantization of dequant(W) * l (rows for output
    scales, columns for input scales), warning; the codes are never scaled directly."""
    pm = ia3_model(base_dir, kind)
    layers = {n: m for n, m in pm.named_modules() if hasattr(m, "ia3_l")}
    expected = {}
    for n, m in layers.items():
        w = quant.dequantize_weight(m.base_layer).float() * m.ia3_l["default"].detach().float()
        expected[n] = requantized_reference(m.base_layer, w)
    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.merge_adapter()
    for n, m in layers.items():
        assert quant.kbit_kind(m.base_layer) == ("4bit" if kind == "nf4" else "8bit")
        torch.testing.assert_close(quant.dequantize_weight(m.base_layer), expected[n],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ia3_dequantized_merge_is_exact(kind, base_dir, tokens):
    """merge_and_unload(dequantize=True) scales the very weights the k-bit matmul used: the fp32
    model matches the unmerged forward up to fp32 rounding (int8 also rounds activations to fp16
    and int8 rows in the unmerged forward, hence its looser bound, as in test_qlora)."""
    pm = ia3_model(base_dir, kind)
    expected = logits(pm, tokens)
    merged = pm.merge_and_unload(dequantize=True)
    assert not any(quant.kbit_kind(m) for m in merged.modules())
    tol = 2e-2 if kind == "int8" else 1e-5
    torch.testing.assert_close(logits(merged, tokens), expected, rtol=0, atol=tol)


# -- bitsandbytes' packed CPU format --------------------------------------------------------------
def linear4bit(quant_type, nested, out_features=64, in_features=128):
    """A Linear4bit on CPU whose blocks span a wide range of scales (the packed absmax layout is
    transposed, so a mix-up of blocks shows)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, out_features * in_features // 64).repeat_interleave(64)
    w = torch.randn(out_features, in_features, generator=g) * scales.view(out_features, -1)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested, module=layer)
    return layer.to("cpu")


def pack(layer):
    """Run bitsandbytes' own trigger: the flag set, eval mode, an input that needs no grad."""
    layer.support_avx512bf16_for_cpu = True
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))
    assert quant.cpu_packed(layer)
    return layer


def packed_reference(layer):
    """The weight a plain-layout copy holds once its block scales are rounded to bf16 (what the
    packing keeps), dequantized by bitsandbytes."""
    state = copy.copy(layer.weight.quant_state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested = False
    state.absmax = absmax.float().bfloat16().float()
    return bnb.functional.dequantize_4bit(layer.weight.data, state)


CASES = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def test_packing_needs_eval_mode_and_no_grad():
    layer = linear4bit("nf4", True)
    layer.support_avx512bf16_for_cpu = True
    layer(torch.randn(2, 128))  # training mode
    layer.eval()(torch.randn(2, 128, requires_grad=True))
    assert not quant.cpu_packed(layer)
    assert quant.cpu_packed(pack(layer))


@pytest.mark.parametrize("quant_type, nested", CASES)
def test_dequantize_reads_a_packed_layer_exactly_and_leaves_it_packed(quant_type, nested):
    layer = linear4bit(quant_type, nested)
    expected = packed_reference(layer)
    pack(layer)
    data = layer.weight.data.clone()
    got = quant.dequantize_weight(layer)
    assert got.shape == (64, 128) and quant.source_dtype(layer) == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert quant.cpu_packed(layer) and torch.equal(layer.weight.data, data)


@pytest.mark.parametrize("quant_type, nested", CASES)
def test_unpacked_layer_holds_the_same_weights_and_saves_them(quant_type, nested):
    """avoid_cpu_packing_ returns the plain layout, the flag off, and the same weights; its
    state_dict (bitsandbytes' k-bit save) loads back to those weights. (bitsandbytes 0.50's own
    inverse, run by state_dict() on a packed layer, leaves a non-double-quantized absmax
    transposed.)"""
    layer = pack(linear4bit(quant_type, nested))
    expected = quant.dequantize_weight(layer)
    quant.avoid_cpu_packing_(torch.nn.Sequential(layer))
    assert not quant.cpu_packed(layer) and not layer.support_avx512bf16_for_cpu
    assert layer.weight.shape == (64 * 128 // 2, 1) and layer.quant_state is layer.weight.quant_state
    torch.testing.assert_close(quant.dequantize_weight(layer), expected, rtol=0, atol=0)
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert not quant.cpu_packed(layer)

    sd = layer.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    loaded = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    torch.testing.assert_close(bnb.functional.dequantize_4bit(loaded.data, loaded.quant_state),
                               expected, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type, nested", CASES)
def test_lora_merge_into_a_packed_base(quant_type, nested):
    """Merging re-quantizes dequant(W) + delta with the settings the layer had before packing
    (dtype, double quantization), into the plain layout."""
    layer = KbitLoraLinear(pack(linear4bit(quant_type, nested)))
    layer.add("default", r=4, alpha=8, scaling=2.0, dropout=0.0, init=False,
              dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
    exact = quant.dequantize_weight(layer.base_layer) + layer.delta_weight("default")
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge(["default"])
    base = layer.base_layer
    assert not quant.cpu_packed(base) and base.weight.quant_state.nested == nested
    assert base.weight.quant_state.dtype == torch.float32
    ref = linear4bit(quant_type, nested)
    torch.testing.assert_close(quant.dequantize_weight(base), requantized_reference(ref, exact),
                               rtol=0, atol=0)


def test_loftq_over_a_packed_base_uses_the_packed_weights(base_dir):
    """LoftQ's residual is W - the weights the layer holds: a packed layer and its unpacked copy
    give the same adapter."""
    full = models.tiny_llama(0, hidden_size=64, intermediate_size=128)
    config = peftkit.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    packed = load(base_dir)
    for m in packed.modules():
        if quant.kbit_kind(m):
            pack(m)
    plain = quant.avoid_cpu_packing_(copy.deepcopy(packed))
    reports, adapters = [], []
    for base in (packed, plain):
        pm = peftkit.get_peft_model(base, config)
        reports.append(loftq_init(pm, full))
        adapters.append(pm.adapter_tensors("default"))
    assert reports[0] == reports[1]
    for name, a in adapters[0].items():
        assert torch.equal(a, adapters[1][name]), name


def test_peftkit_loading_and_prepare_keep_layers_off_the_packed_path(base_dir, monkeypatch):
    """As on an AVX512-BF16 CPU (every Linear4bit's flag set by bitsandbytes at construction):
    after loading.load_base or prepare_model_for_kbit_training an eval forward without grad
    stays in the plain layout and computes what the training-mode forward computes."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    assert bnb.nn.Linear4bit(64, 32).support_avx512bf16_for_cpu
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: None)  # the folder has none
    model, _ = loading.load_base(str(base_dir), quantization_config=BitsAndBytesConfig(
        **KINDS["nf4"]), device_map="cpu")
    raw = load(base_dir)
    for m in raw.modules():
        if quant.kbit_kind(m):
            m.support_avx512bf16_for_cpu = True
    peftkit.prepare_model_for_kbit_training(raw, use_gradient_checkpointing=False)
    ids = torch.tensor([[3, 4, 5, 6]])
    for m in (model, raw):
        layers = [x for x in m.modules() if quant.kbit_kind(x)]
        assert layers and not any(x.support_avx512bf16_for_cpu for x in layers)
        train_out = m.train()(input_ids=ids).logits.detach()
        eval_out = logits(m.eval(), ids)
        assert not any(quant.cpu_packed(x) for x in layers)
        torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)


# -- the device a k-bit model loads on -----------------------------------------------------------
def test_kbit_device_map_follows_local_rank():
    assert quant.kbit_device_map({"LOCAL_RANK": "3"}, cuda=False) == "cpu"
    assert quant.kbit_device_map({"LOCAL_RANK": "3"}, cuda=True, device_count=8) == {"": 3}
    assert quant.kbit_device_map({"LOCAL_RANK": "1"}, cuda=True, device_count=2) == {"": 1}
    # a launcher that shows each rank only its own GPU
    assert quant.kbit_device_map({"LOCAL_RANK": "3"}, cuda=True, device_count=1) == {"": 0}
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
        quant.kbit_device_map({"LOCAL_RANK": "3"}, cuda=True, device_count=2)


def test_qlora_training_loads_on_the_local_rank(monkeypatch):
    """`peftkit train --method qlora` asks for this rank's GPU, not cuda:0."""
    from peftkit.methods import registry

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert registry.spec("qlora").load_kwargs({"quant_type": "nf4"})["device_map"] == {"": 1}
