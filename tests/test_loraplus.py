"""LoRA+ parameter groups equal PEFT's `create_loraplus_optimizer` on the same model."""

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import peftkit
from conftest import TARGETS, make_model


def groups(model, optimizer):
    """Each group as (sorted parameter names, lr, weight_decay)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
            for g in optimizer.param_groups]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("extra", [{}, {"use_dora": True, "bias": "lora_only"},
                                   {"bias": "all", "modules_to_save": ["lm_head"]}],
                         ids=["plain", "dora_bias", "bias_all_head"])
def test_groups_equal_peft(kind, extra):
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], **extra)
    ours = peftkit.get_peft_model(make_model(kind), peftkit.LoraConfig(**kw))
    ref = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kw))
    opts = dict(lr=1e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.01, betas=(0.8, 0.9))
    got = peftkit.create_loraplus_optimizer(ours, torch.optim.AdamW, **opts)
    want = peft_loraplus(ref, torch.optim.AdamW, **opts)
    assert groups(ours, got) == groups(ref, want)
    assert got.defaults["betas"] == (0.8, 0.9)
    b_lrs = {lr for names, lr, _ in groups(ours, got) if any("lora_B" in n for n in names)}
    assert b_lrs == {1e-4 * 16}
    trainable = sum(p.requires_grad for p in ours.parameters())
    assert sum(len(g["params"]) for g in got.param_groups) == trainable


def test_adapter_trainer_builds_the_loraplus_optimizer(tmp_path):
    from transformers import TrainingArguments

    from peftkit.train.trainer import AdapterTrainer

    model = peftkit.get_peft_model(make_model("llama"),
                                   peftkit.LoraConfig(r=4, target_modules=TARGETS["llama"]))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1,
                             report_to=[], use_cpu=True)
    got = AdapterTrainer(model=model, args=args, loraplus_lr_ratio=8).create_optimizer()
    want = peftkit.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3,
                                             loraplus_lr_ratio=8, loraplus_weight_decay=0.1)
    assert groups(model, got) == groups(model, want)
    assert [g["lr"] for g in got.param_groups] == [1e-3, 1e-6, 8e-3, 8e-3]
