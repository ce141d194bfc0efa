"""PiSSA and OLoRA inits (`peftkit.methods.pissa`) against Hugging Face PEFT 0.21.2: the same A, B
and residual base, files that cross both ways, the conversion to plain LoRA on save, merging,
and `peftkit train --init-lora-weights`."""

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


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_kbit_base_refused_by_name(init):
    """PEFT refuses PiSSA on a 4-bit weight; peftkit refuses OLoRA there too (PEFT re-quantizes
    the residual; initialise on the full-precision model instead)."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, module=layer)
    model = nn.Sequential()
    model.add_module("proj", layer.to("cpu"))
    config = peftkit.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=init)
    who = "PEFT refuses PiSSA there too" if init == "pissa" else "peftkit does not compute OLoRA"
    with pytest.raises(UserError, match=f"k-bit layer: {who}"):
        peftkit.get_peft_model(model, config)


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
