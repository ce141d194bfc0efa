"""PiSSA and OLoRA inits (`peftkit.methods.pissa`) against Hugging Face PEFT 0.21.2: the same A, B
and residual base, files that cross both ways, the conversion to plain LoRA on save, merging,
and `peftkit train --init-lora-weights`."""

import copy
import json
import os

import peft
import pytest
import torch

import peftkit
from conftest import TARGETS, logits, make_model, perturb_trainable, train_steps
from peftkit.errors import UserError
from peftkit.methods.lora import LoraLinear

# OLoRA on GPT-2's Conv1D is refused (PEFT 0.21.2 ignores fan_in_fan_out there).
CASES = [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"),
         ("gpt2", "pissa"), ("gpt2", "pissa_niter_2")]
VARIANTS = {"plain": {}, "rslora": {"use_rslora": True, "lora_alpha": 16},
            "patterns": {"rank_pattern": {"0\\..*": 2}, "alpha_pattern": {".*1\\..*": 3.0}},
            "bias_modules_to_save": {"bias": "lora_only", "modules_to_save": ["lm_head"]}}

# Right after init the base holds fl(W - s*B@A) and the branch adds s*B@A back: each weight is off
# by the fp32 rounding of that subtraction, at most ulp(|W| + |s*B@A|) ~ 2^-23 * O(1) for these
# O(0.1..1) weights, so logits (a few O(1) matmuls deep, hidden 16) move by well under 1e-6.
INIT_ATOL = 1e-6


def kwargs_for(kind, init, variant="plain"):
    return {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "init_lora_weights": init,
            **VARIANTS[variant]}


def both(kind, init, variant="plain"):
    """(peftkit model, peft model) on the same base, each seeded as the other."""
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**kwargs_for(kind, init,
                                                                                    variant)))
    torch.manual_seed(0)
    ref = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kwargs_for(kind, init, variant)))
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind,init", CASES)
def test_init_equals_peft_and_keeps_the_model(kind, init, variant, tokens):
    ours, ref = both(kind, init, variant)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:  # A, B and the residual base weights, bit for bit
        assert torch.equal(mine[key], theirs[key]), key
    assert any(isinstance(m, LoraLinear) for m in ours.modules())
    base = logits(make_model(kind), tokens)
    torch.testing.assert_close(logits(ours, tokens), base, atol=INIT_ATOL, rtol=0)
    b = next(m for m in ours.modules() if isinstance(m, LoraLinear)).lora_B["default"].weight
    assert b.abs().max() > 1e-2  # the branch carries the principal part, not zero


@pytest.mark.parametrize("kind,init", CASES)
def test_files_cross_both_ways(kind, init, tokens, tmp_path):
    """An adapter saved as trained (config `init_lora_weights=<init>`) loads onto the untouched
    base in either library, which re-runs the init, seeded alike for `pissa_niter_N`."""
    ours, ref = both(kind, init)
    perturb_trainable(ours)
    perturb_trainable(ref)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    assert json.load(open(tmp_path / "ours" / "adapter_config.json"))["init_lora_weights"] == init
    torch.manual_seed(0)
    in_peft = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours").eval()
    torch.manual_seed(0)
    in_ours = peftkit.PeftModel.from_pretrained(make_model(kind), tmp_path / "ref").eval()
    assert (logits(ours, tokens) - logits(make_model(kind), tokens)).abs().max() > 1e-3
    torch.testing.assert_close(logits(in_peft, tokens), logits(ours, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(in_ours, tokens), logits(ref, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind,init", CASES)
def test_conversion_on_save_gives_lora_for_the_untouched_base(kind, init, variant, tokens,
                                                              tmp_path):
    ours, ref = both(kind, init, variant)
    init_dir, out = tmp_path / "init", tmp_path / "lora"
    ours.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe
    ours.save_pretrained(init_dir)
    ours.peft_config["default"].init_lora_weights = init
    perturb_trainable(ours)
    ours.save_pretrained(out, path_initial_model_for_weight_conversion=str(init_dir))
    assert ours.peft_config["default"].init_lora_weights == init  # the live config is untouched

    config = json.load(open(out / "adapter_config.json"))
    assert config["init_lora_weights"] is True and config["r"] == 8
    if "bias" not in VARIANTS[variant]:  # PEFT refuses to convert with bias (a second adapter)
        # PEFT's conversion of the same trained tensors: the same files (PEFT drops the
        # modules_to_save tensors, which peftkit keeps)
        ref.load_state_dict(ours.state_dict())
        ref.save_pretrained(tmp_path / "ref",
                            path_initial_model_for_weight_conversion=str(init_dir))
        mine = peftkit.checkpoint.load_tensors(out)
        theirs = peftkit.checkpoint.load_tensors(tmp_path / "ref")
        assert set(theirs) <= set(mine)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key
        peft_config = json.load(open(tmp_path / "ref" / "adapter_config.json"))
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights",
                    "use_rslora", "modules_to_save", "bias"):
            assert config[key] == peft_config[key], key
    assert json.load(open(init_dir / "adapter_config.json"))["init_lora_weights"] is True

    expected = logits(ours, tokens)
    for loaded in (peftkit.PeftModel.from_pretrained(make_model(kind), out),
                   peft.PeftModel.from_pretrained(make_model(kind), out)):
        torch.testing.assert_close(logits(loaded.eval(), tokens), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,init", CASES)
def test_merge_unmerge(kind, init, tokens):
    ours, _ = both(kind, init)
    perturb_trainable(ours)
    layers = [m for m in ours.modules() if isinstance(m, LoraLinear)]
    residual = [m.base_layer.weight.clone() for m in layers]
    expected = logits(ours, tokens)
    ours.merge_adapter()
    ours.merge_adapter()  # idempotent
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for m, w in zip(layers, residual):
        torch.testing.assert_close(m.base_layer.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, tokens), expected, atol=1e-5, rtol=0)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, tokens), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,kwargs,message", [
    ("gpt2", {"init_lora_weights": "olora"}, "Conv1D"),
    ("llama", {"init_lora_weights": "pissa", "r": 32}, "exceeds the smaller side"),
])
def test_refused_by_name(kind, kwargs, message):
    config = peftkit.LoraConfig(**{**kwargs_for(kind, None), **kwargs})
    with pytest.raises(UserError, match=message):
        peftkit.get_peft_model(make_model(kind), config)


@pytest.mark.parametrize("bad", ["pissa_niter_", "pissa_niter_x", "corda", "PISSA"])
def test_bad_init_names_the_field(bad):
    with pytest.raises(ValueError, match="init_lora_weights"):
        peftkit.LoraConfig(init_lora_weights=bad)


@pytest.mark.parametrize("extra,message", [
    ({"use_dora": True}, "use_dora"),
    ({"use_rslora": True, "rank_pattern": {"0\\..*": 2}}, "rank_pattern"),
])
def test_conversion_refused_by_name(extra, message, tmp_path):
    """A refused conversion leaves the initial folder's config as it was (and writes nothing)."""
    config = peftkit.LoraConfig(**{**kwargs_for("llama", "pissa"), **extra})
    ours = peftkit.get_peft_model(make_model("llama"), config)
    ours.save_pretrained(tmp_path / "init")
    before = (tmp_path / "init" / "adapter_config.json").read_text()
    with pytest.raises(UserError, match=message):
        ours.save_pretrained(tmp_path / "out",
                             path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert (tmp_path / "init" / "adapter_config.json").read_text() == before
    assert not os.path.exists(tmp_path / "out")


def test_conversion_with_a_mismatched_initial_folder_leaves_it_alone(tmp_path):
    config = lambda targets: peftkit.LoraConfig(  # noqa: E731
        **{**kwargs_for("llama", "pissa"), "target_modules": targets})
    peftkit.get_peft_model(make_model("llama"), config(["q_proj"])).save_pretrained(
        tmp_path / "init")
    before = (tmp_path / "init" / "adapter_config.json").read_text()
    ours = peftkit.get_peft_model(make_model("llama"), config(["q_proj", "v_proj"]))
    with pytest.raises(UserError, match="the initial adapter has no"):
        ours.save_pretrained(tmp_path / "out",
                             path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert (tmp_path / "init" / "adapter_config.json").read_text() == before


def test_conversion_of_a_non_lora_adapter_names_it(tmp_path):
    ours = peftkit.get_peft_model(make_model("llama"), peftkit.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="adapter 'default' is IA3"):
        ours.save_pretrained(tmp_path / "out",
                             path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not os.path.exists(tmp_path / "out")


def test_run_refuses_an_unconvertible_config_before_init(tmp_path):
    """`start_run` checks what `finish_run` will convert before the init (and training)."""
    config = peftkit.LoraConfig(**{**kwargs_for("llama", "pissa"), "use_rslora": True,
                                   "rank_pattern": {"0\\..*": 2}})
    with pytest.raises(UserError, match="rank_pattern"):
        peftkit.methods.pissa.start_run(make_model("llama"), config, str(tmp_path / "out"), None,
                                        True)
    assert not os.path.exists(tmp_path / "out")


def test_resume_from_another_run_uses_its_initial_adapter(tmp_path):
    """`--resume /other/run/checkpoint-N` rebuilds the residual from /other/run/initial_adapter
    (the random pissa_niter_N differs from a new init) and copies it into the output dir for the
    conversion at the end; with none there nor in the output dir, the error names both."""
    pissa = peftkit.methods.pissa
    config = lambda: peftkit.LoraConfig(**kwargs_for("llama", "pissa_niter_2"))  # noqa: E731
    torch.manual_seed(0)
    first = pissa.start_run(make_model("llama"), config(), str(tmp_path / "other"), None, True)
    checkpoint = tmp_path / "other" / "checkpoint-2"
    checkpoint.mkdir()
    torch.manual_seed(1)
    out = tmp_path / "out"
    resumed = pissa.start_run(make_model("llama"), config(), str(out), str(checkpoint), True)
    mine, theirs = resumed.state_dict(), first.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-6)
    assert os.path.isfile(out / "initial_adapter" / "adapter_model.safetensors")
    lone = tmp_path / "lone" / "checkpoint-2"
    lone.mkdir(parents=True)
    with pytest.raises(UserError) as err:
        pissa.start_run(make_model("llama"), config(), str(tmp_path / "new"), str(lone), True)
    for place in (tmp_path / "lone" / "initial_adapter", tmp_path / "new" / "initial_adapter"):
        assert str(place) in str(err.value)


def train(model_dir, data, out, *extra):
    from peftkit import cli

    argv = ["train", "--model", model_dir, "--data", data, "--output-dir", out,
            "--batch-size", 4, "--grad-accum", 1, "--learning-rate", 1e-2, "--seed", 3,
            "--target-modules", "q_proj,v_proj", "--lora-dropout", 0, *extra]
    assert cli.main([str(a) for a in argv]) == 0


def test_train_saves_plain_lora_for_the_untouched_base(model_dir, data, tmp_path):
    """The final adapter is the conversion of the last checkpoint (a PiSSA adapter, which PEFT
    loads by re-running the init on the untouched base)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(model_dir, data, out, "--init-lora-weights", "pissa", "--max-steps", 2,
          "--save-steps", 2)
    config = json.load(open(out / "adapter_config.json"))
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"]) == (True, 16, 32)
    initial = json.load(open(out / "initial_adapter" / "adapter_config.json"))
    assert (initial["init_lora_weights"], initial["r"]) == (True, 8)
    assert json.load(open(out / "checkpoint-2" / "adapter_config.json"))["init_lora_weights"] \
        == "pissa"
    base = lambda: AutoModelForCausalLM.from_pretrained(model_dir)  # noqa: E731
    ids = torch.randint(6, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = logits(peft.PeftModel.from_pretrained(base(), out / "checkpoint-2").eval(), ids)
    assert (expected - logits(base(), ids)).abs().max() > 1e-3
    for loaded in (peft.PeftModel.from_pretrained(base(), out),
                   peftkit.PeftModel.from_pretrained(base(), out)):
        torch.testing.assert_close(logits(loaded.eval(), ids), expected, atol=1e-5, rtol=0)


def test_resumed_pissa_run_matches_the_straight_run(model_dir, data, tmp_path):
    """A resumed run rebuilds its residual base from initial_adapter/ (also for the random
    pissa_niter_N) and ends where the uninterrupted run does."""
    import shutil

    common = ["--init-lora-weights", "pissa_niter_2", "--max-steps", 4, "--save-steps", 2]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(model_dir, data, straight, *common)
    for part in ("checkpoint-2", "initial_adapter"):
        shutil.copytree(straight / part, resumed / part)
    train(model_dir, data, resumed, *common, "--resume")
    a, b = (peftkit.checkpoint.load_tensors(d) for d in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    shutil.rmtree(resumed / "initial_adapter")
    with pytest.raises(UserError, match="initial_adapter"):
        peftkit.methods.pissa.start_run(make_model("llama"), peftkit.LoraConfig(
            init_lora_weights="pissa"), str(resumed), str(resumed / "checkpoint-2"), True)
    assert os.path.isdir(resumed / "checkpoint-4")


def test_kbit_base_refuses_pissa_by_name():
    """PEFT refuses PiSSA on a k-bit weight; so does peftkit (OLoRA works there, below)."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, module=layer)
    model = nn.Sequential()
    model.add_module("proj", layer.to("cpu"))
    config = peftkit.LoraConfig(r=4, target_modules=["proj"], init_lora_weights="pissa")
    with pytest.raises(UserError, match="k-bit layer: PEFT refuses PiSSA there too"):
        peftkit.get_peft_model(model, config)


# -- OLoRA over a bitsandbytes k-bit base ---------------------------------------------------------
KBIT = {  # name -> BitsAndBytesConfig kwargs (4-bit compute dtype = the load dtype)
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}
KBIT_TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def kbit_dir(tmp_path_factory):
    """A tiny Llama whose linears have in_features a multiple of the 4-bit block (64), as in
    tests/test_qlora.py (bitsandbytes' AVX512 CPU path misreads shorter rows)."""
    path = tmp_path_factory.mktemp("tiny-llama-64")
    peftkit.models.tiny_llama(0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def load_kbit(path, kind, dtype=torch.float32):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = dict(KBIT[kind], **({"bnb_4bit_compute_dtype": dtype} if kind != "int8" else {}))
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**cfg), device_map="cpu", dtype=dtype)
    return peftkit.quant.avoid_cpu_packing_(model.eval())


def kbit_both(path, kind, dtype=torch.float32):
    """(peftkit, peft) OLoRA models on the same fresh k-bit base."""
    kw = dict(r=4, lora_alpha=8, target_modules=KBIT_TARGETS, init_lora_weights="olora")
    ours = peftkit.get_peft_model(load_kbit(path, kind, dtype), peftkit.LoraConfig(**kw))
    ref = peft.get_peft_model(load_kbit(path, kind, dtype), peft.LoraConfig(**kw))
    return ours.eval(), ref.eval()


def lora_bases(model):
    """{path: k-bit base layer} of the adapted layers."""
    return {n: m.base_layer for n, m in model.named_modules()
            if hasattr(m, "lora_A") and peftkit.quant.kbit_kind(m.base_layer)}


def kbit_logit_atol(expected, dtype):
    """fp32: both libraries run the same bitsandbytes kernels on the same codes and fp32 adapters;
    only the LoRA sum's order could differ (observed 0). bf16: PEFT rounds the LoRA output to bf16
    before the sum, peftkit rounds the sum once: two bf16 steps of the largest logit, as in
    tests/test_qlora.py::test_bf16_compute_matches_peft."""
    return 1e-6 if dtype == torch.float32 else 2 * 2 ** -7 * expected.abs().max().item()


@pytest.mark.parametrize("kind,dtype", [("nf4_dq", torch.float32), ("fp4", torch.float32),
                                        ("int8", torch.float32), ("nf4_dq", torch.bfloat16)],
                         ids=["nf4_dq", "fp4", "int8", "nf4_dq-bf16"])
def test_kbit_olora_init_equals_peft(kind, dtype, kbit_dir, tokens):
    """A, B bit for bit (QR of the dequantized weight in fp32, rounded to the 4-bit compute
    dtype), and the base re-quantized from the fp32 residual to the very codes PEFT stores."""
    ours, ref = kbit_both(kbit_dir, kind, dtype)
    mine, theirs = ours.state_dict(), ref.state_dict()
    lora_keys = [k for k in theirs if ".lora_" in k]
    assert len(lora_keys) == 2 * 2 * len(KBIT_TARGETS)
    for key in lora_keys:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    expected = logits(ref, tokens)  # a forward first: PEFT's int8 layer then takes the new scales
    torch.testing.assert_close(logits(ours, tokens), expected, rtol=0,
                               atol=kbit_logit_atol(expected, dtype))
    bases, ref_bases = lora_bases(ours), lora_bases(ref)
    assert bases.keys() == ref_bases.keys() and len(bases) == 2 * len(KBIT_TARGETS)
    untouched = load_kbit(kbit_dir, kind, dtype)
    for path, layer in bases.items():
        w = peftkit.quant.dequantize_weight(layer)
        assert torch.equal(w, peftkit.quant.dequantize_weight(ref_bases[path])), path
        before = untouched.get_submodule(path.removeprefix("base_model.model."))
        assert not torch.equal(w, peftkit.quant.dequantize_weight(before)), path  # re-quantized
    b = ours.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["nf4_dq", "int8"])
def test_kbit_olora_files_cross_both_ways(kind, kbit_dir, tokens, tmp_path):
    """An adapter saved as trained loads onto the untouched k-bit base in either library, which
    re-runs the (deterministic) init and re-quantization: the same model as the one saved."""
    ours, ref = kbit_both(kbit_dir, kind)
    perturb_trainable(ours)
    perturb_trainable(ref, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    assert json.load(open(tmp_path / "ours" / "adapter_config.json"))["init_lora_weights"] \
        == "olora"
    in_peft = peft.PeftModel.from_pretrained(load_kbit(kbit_dir, kind), tmp_path / "ours").eval()
    in_ours = peftkit.PeftModel.from_pretrained(load_kbit(kbit_dir, kind), tmp_path / "ref").eval()
    torch.testing.assert_close(logits(in_peft, tokens), logits(ours, tokens), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(in_ours, tokens), logits(ref, tokens), rtol=0, atol=1e-6)


def stored_absmax(state):
    """The block scales a 4-bit weight's codes are multiplied by (double quantization undone)."""
    import bitsandbytes as bnb

    if state.nested:
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


@pytest.mark.parametrize("kind", ["nf4_dq", "fp4"])
def test_kbit_olora_conversion_on_save(kind, kbit_dir, tokens, tmp_path):
    """The converted rank-2r LoRA is PEFT's file, and on the untouched 4-bit base W it gives
    W + s(BA - B0A0), while the trained model computes Q(W - sB0A0) + sBA: per weight they differ
    by the re-quantization error of the residual, which is within half the widest codebook gap
    times its block's absmax, plus the stored absmax's own rounding (double quantization)."""
    import bitsandbytes as bnb

    ours, ref = kbit_both(kbit_dir, kind)
    initial = {p: (layer.lora_B["default"].weight.detach().clone(),
                   layer.lora_A["default"].weight.detach().clone(), layer.scaling["default"])
               for p, layer in ours.named_modules() if isinstance(layer, LoraLinear)}
    ours.peft_config["default"].init_lora_weights = True
    ours.save_pretrained(tmp_path / "init")
    ours.peft_config["default"].init_lora_weights = "olora"
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(
        tmp_path / "init"))
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora_" in k},
                        strict=False)
    ref.save_pretrained(tmp_path / "ref", path_initial_model_for_weight_conversion=str(
        tmp_path / "init"))
    mine, theirs = (peftkit.checkpoint.load_tensors(tmp_path / d) for d in ("lora", "ref"))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key

    converted = peftkit.PeftModel.from_pretrained(load_kbit(kbit_dir, kind), tmp_path / "lora")
    in_peft = peft.PeftModel.from_pretrained(load_kbit(kbit_dir, kind), tmp_path / "lora")
    torch.testing.assert_close(logits(converted.eval(), tokens), logits(in_peft.eval(), tokens),
                               rtol=0, atol=1e-6)
    half_gap = bnb.functional.get_4bit_type(KBIT[kind]["bnb_4bit_quant_type"], device="cpu") \
        .sort().values.diff().max().item() / 2
    for path, (b0, a0, s) in initial.items():
        trained, layer = ours.get_submodule(path), converted.get_submodule(path)
        w = peftkit.quant.dequantize_weight(layer.base_layer)  # untouched
        residual = w - s * b0 @ a0  # what the init re-quantized
        gap = (w + layer.delta_weight("default")) - (
            peftkit.quant.dequantize_weight(trained.base_layer) + trained.delta_weight("default"))
        state = trained.base_layer.weight.quant_state
        absmax = residual.abs().reshape(-1, state.blocksize).amax(dim=1, keepdim=True)
        absmax_err = (stored_absmax(state).reshape(-1, 1) - absmax).abs()
        bound = half_gap * absmax + absmax_err + 1e-5  # 1e-5: fp32 rounding of the deltas
        assert (gap.abs().reshape(-1, state.blocksize) <= bound).all(), path
        assert gap.abs().max() > 1e-4, path  # the re-quantization error is really there


def test_kbit_olora_merges_as_qlora_does(kbit_dir, tokens):
    """merge_and_unload(dequantize=True) is exact (fp32 summation order); merging into the
    4-bit weight re-quantizes, with QLoRA's warning (its bound: tests/test_qlora.py)."""
    ours, _ = kbit_both(kbit_dir, "nf4_dq")
    perturb_trainable(ours)
    expected = logits(ours, tokens)
    merged = copy.deepcopy(ours).merge_and_unload(dequantize=True)
    torch.testing.assert_close(logits(merged, tokens), expected, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantizes"):
        ours.merge_and_unload()


def test_kbit_olora_resume_rebuilds_the_same_base(kbit_dir, tmp_path):
    """`start_run` resuming rebuilds the re-quantized residual from initial_adapter/: the same
    codes as the fresh init."""
    pissa = peftkit.methods.pissa
    config = lambda: peftkit.LoraConfig(r=4, target_modules=KBIT_TARGETS,  # noqa: E731
                                        init_lora_weights="olora")
    first = pissa.start_run(load_kbit(kbit_dir, "nf4_dq"), config(), str(tmp_path / "a"), None,
                            True)
    (tmp_path / "a" / "checkpoint-2").mkdir()
    resumed = pissa.start_run(load_kbit(kbit_dir, "nf4_dq"), config(), str(tmp_path / "b"),
                              str(tmp_path / "a" / "checkpoint-2"), True)
    bases = lora_bases(resumed)
    for path, layer in lora_bases(first).items():
        assert torch.equal(peftkit.quant.dequantize_weight(layer),
                           peftkit.quant.dequantize_weight(bases[path])), path


def test_train_qlora_olora_saves_the_conversion(model_dir, data, tmp_path):
    """`peftkit train --method qlora --init-lora-weights olora`: the final adapter is the plain
    LoRA conversion of the last checkpoint (an OLoRA adapter, which PEFT loads by re-running the
    init on the untouched 4-bit base); both libraries load either file to the same logits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(model_dir, data, out, "--method", "qlora", "--init-lora-weights", "olora",
          "--max-steps", 2, "--save-steps", 2)
    config = json.load(open(out / "adapter_config.json"))
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"]) == (True, 16, 32)
    assert json.load(open(out / "checkpoint-2" / "adapter_config.json"))["init_lora_weights"] \
        == "olora"
    final, trained, initial = (peftkit.checkpoint.load_tensors(d) for d in (
        out, out / "checkpoint-2", out / "initial_adapter"))
    for key, t in trained.items():  # [B, -B0] and [A; A0]
        other = -initial[key] if key.endswith("lora_B.weight") else initial[key]
        assert torch.equal(final[key], torch.cat([t, other], dim=int("lora_B" in key))), key

    def base():  # as `peftkit train --method qlora` loads it
        return peftkit.quant.avoid_cpu_packing_(AutoModelForCausalLM.from_pretrained(
            model_dir, **peftkit.quant.kbit_load_kwargs("nf4")))

    ids = torch.randint(6, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    for folder in (out, out / "checkpoint-2"):
        expected = logits(peft.PeftModel.from_pretrained(base(), folder).eval(), ids)
        got = logits(peftkit.PeftModel.from_pretrained(base(), folder).eval(), ids)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bf16_base_init_equals_peft(init, autocast):
    """A bf16 base: SVD/QR in fp32, the residual and A, B rounded to bf16 (then A, B upcast to
    fp32 under autocast_adapter_dtype), as PEFT does."""
    kw = kwargs_for("llama", init)
    ours = peftkit.get_peft_model(make_model("llama").to(torch.bfloat16), peftkit.LoraConfig(**kw),
                                  autocast_adapter_dtype=autocast)
    ref = peft.get_peft_model(make_model("llama").to(torch.bfloat16), peft.LoraConfig(**kw),
                              autocast_adapter_dtype=autocast)
    mine, theirs = ours.state_dict(), ref.state_dict()
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("kind,init", [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_training_follows_peft(kind, init, tokens):
    """Training from the same PiSSA/OLoRA init takes PEFT's steps: ten AdamW steps (dropout 0)
    give the same losses and then the same logits, to fp32 rounding."""
    ours, ref = both(kind, init)
    batch = {"input_ids": tokens}
    torch.manual_seed(0)  # GPT-2's own dropout draws the same masks in both
    mine = train_steps(ours.train(), batch, lr=1e-2)
    torch.manual_seed(0)
    theirs = train_steps(ref.train(), batch, lr=1e-2)
    assert mine[-1] < mine[0] - 0.1  # it learns
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours.eval(), tokens), logits(ref.eval(), tokens),
                               atol=1e-4, rtol=1e-4)
