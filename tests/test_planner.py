"""Planner: exact counts on the meta device, the memory formulas, and a measured CPU peak."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from peftkit.loss import causal_lm_loss
from peftkit.planner import Settings, estimate, load_config, parse_size
from peftkit.planner.activations import Arch, activations
from peftkit.planner.params import LoraSite
from peftkit.planner.quant import nf4_bytes, nf4_constant_bytes
from peftkit.swiglu import lean_swiglu

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
            tie_word_embeddings=False)

# Published parameter counts (model cards / the models' safetensors index).
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
             "llama-2-70b": 68_976_648_192, "llama-1-65b": 65_285_660_672,
             "llama-3.1-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496,
             "mistral-7b": 7_241_732_096, "qwen2.5-0.5b": 494_032_768,
             "qwen2.5-7b": 7_615_616_512, "qwen2.5-72b": 72_706_203_648,
             "smollm2-135m": 134_515_008, "gpt2": 124_439_808}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_counts_match_published(name):
    est = estimate(name, "full", {}, Settings(seq_len=8))
    assert est.census.trainable == est.census.total == PUBLISHED[name]


def test_llama2_7b_lora_r16_qkvo_is_16_777_216():
    est = estimate("llama-2-7b", "lora", {"r": 16, "target_modules": QKVO})
    assert est.census.trainable == 16_777_216 == 32 * 4 * 16 * (4096 + 4096)
    assert est.census.total == PUBLISHED["llama-2-7b"] + 16_777_216


def test_qlora_counts_as_lora_and_stores_nf4():
    opts = {"r": 8, "target_modules": "all-linear"}
    lora = estimate("llama-2-7b", "lora", opts)
    q = estimate("llama-2-7b", "qlora", opts)
    assert q.census.trainable == lora.census.trainable
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert q.plan.weights["nf4"] == linear // 2
    assert q.plan.weights["bf16"] == (PUBLISHED["llama-2-7b"] - linear) * 2


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(384, 320)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                        quant_type="nf4")
    got = state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        got += state.state2.absmax.numel() * 4 + state.offset.numel() * 4
    assert packed.numel() == nf4_bytes(w.numel())
    assert got == nf4_constant_bytes(w.numel(), double_quant)


def _saved_bytes(model, ids):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora, dropout", [
    (None, 0.0), (QKVO, 0.0), ("all-linear", 0.0), (["q_proj", "down_proj", "lm_head"], 0.0),
    (QKVO, 0.1), ("all-linear", 0.1), (["o_proj"], 0.1), (["v_proj", "up_proj"], 0.1),
    (["lm_head"], 0.1)])
def test_activation_formula_is_exact(dtype, lora, dropout, lean):
    """The Llama-family count equals the bytes autograd saves (parameters excluded), with LoRA
    dropout too (a bit-packed mask), when the first layer's early modules are frozen (they save
    nothing), and with the MLPs through `swiglu.SiluMul` (`lean`, as peftkit train runs them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import LoraConfig, get_peft_model
    from peftkit.methods.lora import LoraLinear

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=lora, lora_dropout=dropout))
    model.train()
    b, s = 2, 32
    with lean_swiglu(model) if lean else contextlib.nullcontext():
        measured = _saved_bytes(model, torch.randint(0, 256, (b, s)))
    sites = [LoraSite(p, m.in_features, 4, dropout, m.lora_A["default"].weight.dtype)
             for p, m in model.named_modules() if isinstance(m, LoraLinear)]
    acts = activations(Arch.of(cfg), dtype.itemsize, b, s, lora is None, lora is None, sites,
                       lean_mlp=lean)
    loss_saved = b * s * (4 * cfg.vocab_size + 8) + 4  # fp32 log-probs, labels, a scalar
    assert acts.plain + loss_saved == measured


def _peak_step_bytes(model, ids, path, peftkit_step: bool):
    """Peak of tensor bytes allocated during one training step (the second: AdamW's states
    exist), above what was alive before it, from the profiler's CPU memory events.
    `peftkit_step`: peftkit train's forward (fused loss; lean MLPs unless checkpointing)."""
    from torch.profiler import ProfilerActivity, profile

    def loss():
        if not peftkit_step:
            return model(input_ids=ids, labels=ids).loss
        with lean_swiglu(model):  # a no-op under checkpointing
            return causal_lm_loss(model, ids, ids)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    for step in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=False) if step else contextlib.nullcontext() as prof:
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


@pytest.mark.parametrize("method, dtype, checkpointing, options, peftkit_step", [
    ("lora", torch.float32, False, {"target_modules": "all-linear", "lora_dropout": 0.1}, False),
    ("full", torch.bfloat16, False, {}, False),
    ("lora", torch.float32, True, {"target_modules": QKVO}, False),
    ("full", torch.float32, True, {}, False),
    ("lora", torch.float32, False, {"target_modules": "all-linear", "lora_dropout": 0.1}, True),
    ("lora", torch.bfloat16, False, {"target_modules": QKVO}, True),
    ("full", torch.bfloat16, False, {}, True),
    ("lora", torch.float32, True, {"target_modules": QKVO}, True)])
def test_plan_total_is_the_peak_of_live_tensors(tmp_path, method, dtype, checkpointing, options,
                                                peftkit_step):
    """weights + optimizer states + the plan's larger moment = the allocator's peak, on a tiny
    Llama (vocab 2048 so the loss matters), for transformers' stock step and for peftkit train's
    (fused loss, lean MLPs). Tolerance 1%: the plan leaves out 16 KB here, the position ids and
    the fused loss's per-chunk vectors; it counts the labels (8 bytes a token) that the caller
    had allocated before the step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    fields = dict(TINY)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(fields))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(fields.pop("model_type"), **fields)).to(dtype)
    if method == "lora":
        options = {"r": 4, **options}
        model = get_peft_model(model, LoraConfig(**options))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    b, s = 2, 64
    measured = _peak_step_bytes(model, torch.randint(0, TINY["vocab_size"], (b, s)),
                                tmp_path / "trace.json", peftkit_step)
    plan = estimate(str(cfg), method, options, Settings(
        batch_size=b, seq_len=s, dtype=dtype, checkpointing=checkpointing,
        fused_loss=peftkit_step, lean_mlp=peftkit_step)).plan
    assert abs(plan.total - plan.weight_bytes - plan.optimizer - measured) <= 0.01 * measured


# The validation model: Llama family, ~56M parameters, fp32 on CPU.
SMALL = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
             tie_word_embeddings=False)
CHILD = r"""
import json, sys, torch
torch.set_num_threads(2)
from transformers import AutoConfig, AutoModelForCausalLM
from peftkit import LoraConfig, get_peft_model

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

fields, b, s = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ids = torch.randint(0, fields["vocab_size"], (b, s))
config = AutoConfig.for_model(fields.pop("model_type"), **fields)
build = lambda: get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=16, target_modules=%r))
with torch.device("meta"):  # import the modules building the model imports, before the base
    build()
base = rss("VmRSS:")
model = build()
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
for step in range(2):
    if step == 1:
        open("/proc/self/clear_refs", "w").write("5")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss
print(json.dumps({"peak": rss("VmHWM:") - base}))
""" % (QKVO,)


def test_estimate_matches_measured_cpu_peak(tmp_path):
    """Peak RSS of a LoRA training step (the second: optimizer states exist) vs the plan.

    glibc keeps freed memory of tensors under its dynamic mmap threshold (which climbs to 32 MiB
    after the first large free) resident, so by default RSS holds ~180 MiB of already-freed
    activations here; a fixed threshold of 64 KiB hands every freed tensor back, and RSS then
    counts live tensors plus a near-constant rest. Measured on 2026-11-28: plan 825.7 MiB =
    the profiler's peak of live tensor bytes (in LogSoftmaxBackward), RSS 854 MiB; the 28 MiB
    rest is kernel code paged in (11 MiB RssFile) and runtime state created at the first step.
    Tolerance: the plan may not exceed RSS, and may be below it by at most 6% (51 MiB), less than
    any one term it could get wrong (one copy of the fp32 logits is 125 MiB).
    """
    b, s = 4, 256
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL))
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SMALL), str(b), str(s)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    plan = estimate(str(cfg), "lora", {"r": 16, "target_modules": QKVO},
                    Settings(batch_size=b, seq_len=s, dtype=torch.float32, fused_loss=False,
                             lean_mlp=False)).plan
    print(f"estimate {plan.total / 2**20:.1f} MiB, measured peak {measured / 2**20:.1f} MiB")
    assert plan.total <= measured <= plan.total + 0.06 * measured


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="unknown model 'llama-2-7x'.*llama-2-7b"):
        load_config("llama-2-7x")
    with pytest.raises(ValueError, match="cannot read the memory size '24 gigs'"):
        parse_size("24 gigs")
    assert parse_size("24GB") == parse_size("24GiB") == 24 * 2**30
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        estimate("gpt2", "dora")
    with pytest.raises(ValueError, match="num_virtual_tokens.*do not apply to method 'lora'"):
        estimate("gpt2", "lora", {"num_virtual_tokens": 8})


def test_estimate_command_json_and_gpu(capsys):
    import argparse

    from peftkit.commands import estimate as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["estimate", "--model", "llama-2-7b", "--method", "lora", "--r", "16",
                              "--target-modules", "q_proj,k_proj,v_proj,o_proj", "--gpu", "80GB",
                              "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] == 16_777_216 and out["fits"] is True
    args = parser.parse_args(["estimate", "--model", "gpt2", "--gpu", "lots"])
    assert args.func(args) == 2
    assert "cannot read the memory size 'lots'" in capsys.readouterr().err
