"""The speed layer (`peftkit.fast`) on the model `get_peft_model` returns: the stock values, the
fast parts taken by a plain loop, a stock Trainer and TRL's SFTTrainer, logits wherever a caller
needs them, autocast, gradient checkpointing of three origins, and hooks respected."""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import peftkit
from peftkit import fast, models
from peftkit.fast import dtype as fast_dtype
from peftkit.fast import lora_fn, swiglu
from peftkit.fast.loss import LinearCrossEntropy

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
PARTS = {"loss": LinearCrossEntropy, "mlp": swiglu.SiluMul, "lora_function": lora_fn.LoraFunction}
LAYERS = 2  # models.tiny_llama


def pair(dropout=0.0):
    """(stock, fast): peftkit models over copies of one tiny Llama with the same nonzero adapter
    weights (init_lora_weights=False), the first with `speed=False`."""
    base = models.tiny_llama(0)
    cfg = dict(r=4, lora_alpha=8, target_modules=QKVO, lora_dropout=dropout,
               init_lora_weights=False)
    torch.manual_seed(0)
    stock = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**cfg), speed=False)
    torch.manual_seed(0)
    quick = peftkit.get_peft_model(base, peftkit.LoraConfig(**cfg))
    return stock.train(), quick.train()


def batch(shape=(3, 10), seed=1):
    ids = torch.randint(3, 64, shape, generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


@pytest.fixture
def calls(monkeypatch):
    """{part: number of calls of its autograd function}."""
    counts = dict.fromkeys(PARTS, 0)
    for part, fn in PARTS.items():
        def counted(*args, real=fn.apply, part=part):
            counts[part] += 1
            return real(*args)

        monkeypatch.setattr(fn, "apply", counted)
    return counts


def loss_and_grads(model, seed=0, **inputs):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), grads(model)


def grads(model):
    """{parameter name: gradient}, names without FSDP's checkpoint-wrapper level."""
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad
            for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got, expected, rtol=1e-5, atol=1e-7):
    """fp32 loss and gradients of the same computation summed in another order: the fused loss
    forms the softmax as exp(z - max) / sum, transformers as exp(log_softmax)."""
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("off", [None, "loss", "mlp", "lora_function"])
def test_plain_loop_runs_each_part_and_matches_stock(off, calls):
    """`model(input_ids=..., labels=...)` in training: every part on runs (one fused loss, one
    SiluMul per layer, one LoraFunction per adapted module), a part switched off with
    `fast.apply` does not, and the loss and gradients are the stock model's."""
    stock, quick = pair()
    if off:
        fast.apply(quick, **{off: False})
    ids, labels = batch()
    expected = loss_and_grads(stock, input_ids=ids, labels=labels)
    assert calls == dict.fromkeys(PARTS, 0)
    got = loss_and_grads(quick, input_ids=ids, labels=labels)
    assert_same(got, expected)
    want = {"loss": 1, "mlp": LAYERS, "lora_function": 4 * LAYERS}
    assert calls == {part: 0 if part == off else n for part, n in want.items()}


def test_dropout_masks_are_those_of_the_stock_forward_in_distribution(calls):
    """With dropout the two draw different masks, so the losses differ, but each is a valid
    sample: the fast model's loss with dropout stays within the spread of the stock model's."""
    stock, quick = pair(dropout=0.1)
    ids, labels = batch()
    stock_losses = torch.stack([loss_and_grads(stock, s, input_ids=ids, labels=labels)[0]
                                for s in range(20)])
    fast_losses = torch.stack([loss_and_grads(quick, s, input_ids=ids, labels=labels)[0]
                               for s in range(20)])
    assert calls["lora_function"] == 20 * 4 * LAYERS
    assert stock_losses.std() > 0  # dropout is on
    spread = 5 * stock_losses.std() / 20 ** 0.5 + 5 * fast_losses.std() / 20 ** 0.5
    assert abs(fast_losses.mean() - stock_losses.mean()) < spread


def test_logits_where_a_caller_needs_them(calls):
    """Only a training forward that asks for the loss alone skips the logits. Evaluation, a
    forward without grad (prediction_step), without labels, or with more outputs requested,
    and generate, return the stock logits."""
    stock, quick = pair()
    ids, labels = batch()
    out = quick(input_ids=ids, labels=labels)
    assert out.logits is None and out.loss is not None and calls["loss"] == 1
    with torch.no_grad():
        for train in (True, False):
            stock.train(train), quick.train(train)
            for kw in ({"labels": labels}, {}):
                got, ref = quick(input_ids=ids, **kw), stock(input_ids=ids, **kw)
                torch.testing.assert_close(got.logits, ref.logits, rtol=1e-6, atol=1e-6)
    stock.train(), quick.train()
    out = quick(input_ids=ids, labels=labels, output_hidden_states=True)
    assert out.logits is not None and out.hidden_states is not None
    assert calls["loss"] == 1
    stock.eval(), quick.eval()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(quick.generate(input_ids=ids, **kw), stock.generate(input_ids=ids, **kw))


def test_stock_trainer_uses_the_fast_parts_and_keeps_eval_logits(tmp_path, calls):
    """transformers' own Trainer, 2 training steps: one fused loss per step, the same training
    losses as the stock model's; `predict` returns the stock logits."""
    from transformers import Trainer, TrainingArguments

    ids, labels = batch(shape=(4, 10))
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    collate = lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}  # noqa: E731
    results = []
    for model in pair():
        args = TrainingArguments(output_dir=str(tmp_path / str(len(results))), max_steps=2,
                                 per_device_train_batch_size=2, learning_rate=1e-2,
                                 logging_steps=1, report_to="none", use_cpu=True,
                                 dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                          data_collator=collate)
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        results.append((torch.tensor(losses), torch.as_tensor(trainer.predict(rows).predictions)))
        if not results[1:]:
            assert calls["loss"] == 0
    assert calls["loss"] == 2 and calls["mlp"] > 0 and calls["lora_function"] > 0
    (stock_losses, stock_logits), (losses, logits) = results
    assert len(losses) == 2
    torch.testing.assert_close(losses, stock_losses, rtol=1e-5, atol=0)
    assert logits.shape == (4, 10, 64)
    torch.testing.assert_close(logits, stock_logits, rtol=1e-5, atol=1e-5)


def test_under_autocast_as_accurate_as_the_stock_forward(calls):
    """Under CPU bf16 autocast the fast parts run (their backward under the same autocast), and
    their loss and gradients err against the fp32 ones no more than the stock model's do under
    the same autocast (both round to bf16 at every matmul, in different places)."""
    stock, quick = pair()
    ids, labels = batch()
    exact = loss_and_grads(copy.deepcopy(stock), input_ids=ids, labels=labels)
    errors = []
    for model in (stock, quick):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = loss_and_grads(model, input_ids=ids, labels=labels)
        assert all(g.dtype == torch.float32 for g in grads.values())
        errors.append([abs(loss - exact[0]).item() / exact[0].item()]
                      + [((grads[n] - g).norm() / g.norm()).item() for n, g in exact[1].items()])
    assert calls == {"loss": 1, "mlp": LAYERS, "lora_function": 4 * LAYERS}
    stock_err, fast_err = torch.tensor(errors)
    assert stock_err.max() > 1e-4  # autocast did round to bf16
    assert (fast_err <= 2 * stock_err + 1e-3).all(), errors


def checkpoint_layers_like_fsdp(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))


@pytest.mark.parametrize("origin", ["transformers", "fsdp", "torch"])
def test_gradient_checkpointing_of_any_origin(origin, calls):
    """With dropout on, checkpointing by transformers, by FSDP's checkpoint wrapper, or by
    torch.utils.checkpoint around the whole forward (fused loss included) gives the gradients
    of the same model without checkpointing: the recomputation draws the same dropout masks and
    saves what the first forward saved (no CheckpointError)."""
    _, quick = pair(dropout=0.1)
    ids, labels = batch()
    expected = loss_and_grads(quick, input_ids=ids, labels=labels)
    counts = dict(calls)
    if origin == "transformers":
        quick.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    elif origin == "fsdp":
        checkpoint_layers_like_fsdp(quick.get_base_model())
    if origin == "torch":
        forward = lambda i, lab: quick(input_ids=i, labels=lab)  # noqa: E731
        torch.manual_seed(0)
        quick.zero_grad(set_to_none=True)
        loss = checkpoint(lambda i, lab: forward(i, lab).loss, ids, labels, use_reentrant=False)
        loss.backward()
        got = loss.detach(), grads(quick)
    else:
        got = loss_and_grads(quick, input_ids=ids, labels=labels)
    assert_same(got, expected, rtol=1e-6, atol=1e-8)
    # the recomputation ran the fast parts again
    assert calls["mlp"] - counts["mlp"] == 2 * LAYERS
    assert calls["lora_function"] - counts["lora_function"] == 2 * 4 * LAYERS


def test_hooked_modules_get_the_stock_calls(calls):
    """A hook on a LoRA A or on the output head fires: that branch calls its modules, and the
    head computes logits (a training forward then returns them). A global module hook turns
    every fused path off. Losses and gradients stay the stock ones."""
    stock, quick = pair()
    ids, labels = batch()
    expected = loss_and_grads(stock, input_ids=ids, labels=labels)
    seen = []
    a = quick.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    handles = [a.register_forward_hook(lambda *x: seen.append("lora_A")),
               quick.get_base_model().lm_head.register_forward_hook(lambda *x: seen.append("head"))]
    assert_same(loss_and_grads(quick, input_ids=ids, labels=labels), expected)
    assert seen == ["lora_A", "head"]
    assert calls == {"loss": 0, "mlp": LAYERS, "lora_function": 4 * LAYERS - 1}
    for h in handles:
        h.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *x: None)
    try:
        assert_same(loss_and_grads(quick, input_ids=ids, labels=labels), expected)
    finally:
        handle.remove()
    assert calls == {"loss": 0, "mlp": LAYERS, "lora_function": 4 * LAYERS - 1}  # no more


def test_sft_trainer_backbone_runs_the_fast_parts(tmp_path, calls):
    """TRL's SFTTrainer computes the loss with its own fused LM head over `model.base_model`;
    the backbone's MLPs and LoRA branches still take the fast parts, in the first forward and in
    the recomputation of SFTConfig's default gradient checkpointing."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_fixtures import tiny_model_dir

    path = tiny_model_dir(str(tmp_path / "model"))
    model = peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                   peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                         max_steps=1, report_to="none", dataloader_pin_memory=False, bf16=False)
    trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=AutoTokenizer.from_pretrained(path)).train()
    layers = model.get_base_model().config.num_hidden_layers
    assert args.gradient_checkpointing
    assert calls == {"loss": 0, "mlp": 2 * layers, "lora_function": 2 * 2 * layers}


def test_unload_gives_the_stock_base_model_back():
    _, quick = pair()
    base = quick.unload()
    assert not any("forward" in m.__dict__ for m in base.modules())


def test_apply_takes_a_peftkit_model_only():
    with pytest.raises(TypeError, match="PeftModel"):
        fast.apply(models.tiny_llama(0), loss=False)


@pytest.mark.parametrize("cuda, flags, dtype", [
    (False, {"avx512f", "avx512_bf16"}, torch.bfloat16),
    (False, {"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
    (False, {"avx2", "avx512f", "avx512_vnni"}, torch.float32),
    (False, set(), torch.float32)])
def test_training_dtype_follows_the_hardware(cuda, flags, dtype):
    chosen, why = fast_dtype.training_dtype(cuda=cuda, flags=flags)
    assert chosen == dtype and ("bf16" in why)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert fast_dtype.cpu_flags(str(info)) == {"fpu", "avx512f", "amx_bf16"}
    assert fast_dtype.cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("flags, said", [({"amx_bf16"}, "bfloat16"), ({"avx2"}, "float32")])
def test_doctor_reports_the_training_dtype(flags, said, monkeypatch, capsys):
    import argparse

    from peftkit.commands import doctor

    monkeypatch.setattr(fast_dtype, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    doctor.register(parser.add_subparsers())
    args = parser.parse_args(["doctor", "--r", "16", "--lora-alpha", "32"])
    args.func(args)
    assert capsys.readouterr().out.startswith(f"training dtype: {said} (the CPU ")


def test_lora_function_with_dropout_under_autocast():
    """Under bf16 autocast, with dropout: the function's output and gradients are those of the
    explicit formula with its mask under the same autocast. Both round the operands of their
    matmuls to bf16 (2**-8 relative each), at other points, so they differ by a few 2**-8 of the
    largest value (observed up to 1.9 * 2**-8); y is not rounded (an fp32 y stays exact)."""
    torch.manual_seed(0)
    y = torch.randn(2, 40, 24, requires_grad=True)
    x = torch.randn(2, 40, 32, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    p, s = 0.2, 2.0
    torch.manual_seed(7)
    keep = lora_fn.keep_mask(torch.Size((80, 32)), p, x.device).view(2, 40, 32)
    w = torch.randn(2, 40, 24)
    results = []
    for fn in (lambda: lora_fn.lora_forward(y, x, a, b, s, p),
               lambda: (y + s * ((x * keep / (1 - p)) @ a.T) @ b.T).to(y.dtype)):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
            grads = torch.autograd.grad((out.float() * w).sum(), (y, x, a, b))
        results.append((out.float(), grads))
    (out, grads), (ref_out, ref_grads) = results
    for got, ref in zip((out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == ref.dtype
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 2 ** -6
