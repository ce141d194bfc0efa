import json
import os

import pytest
import torch

from peftkit import models
from train_fixtures import tiny_model_dir

torch.set_num_threads(2)
# `peftkit train --dtype auto` picks bf16 on CPUs with AVX512-BF16/AMX. The suite's numeric checks
# (sharded vs single-process runs, resume, PEFT parity) are written for fp32 on both CPU families;
# tests of the bf16 choice and of bf16 training pass --dtype or call the chooser themselves.
os.environ["PEFTKIT_DTYPE"] = "float32"


def make_model(kind: str, seed: int = 0):
    """Tiny random models; the Llama one has attention biases so every bias mode saves tensors."""
    if kind == "llama":
        return models.tiny_llama(seed, attention_bias=True)
    if kind == "gpt2":
        return models.tiny_gpt2(seed)
    raise ValueError(kind)


TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"]}


def perturb_trainable(model, seed: int = 3, scale: float = 0.1):
    """Give every trainable tensor (adapters, biases, modules_to_save copies) a distinct value;
    returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def train_steps(model, batch, lr: float, steps: int = 10) -> list[float]:
    """`steps` AdamW steps on `batch` (labels = inputs); the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trainer_changes(model, output_dir) -> tuple[set, set]:
    """Train 3 steps with transformers' Trainer on random tokens; (names of the parameters that
    changed, names of the trainable ones)."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (8, 8), generator=g)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    return changed, {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 64, (2, 7), generator=g)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its character tokenizer saved in a folder, for CLI tests."""
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 prompt/completion rows (`a+b=` -> the sum) as JSONL."""
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
