import pytest
import torch

from peftkit import models

torch.set_num_threads(2)


def make_model(kind: str, seed: int = 0):
    """Tiny random models; the Llama one has attention biases so every bias mode saves tensors."""
    if kind == "llama":
        return models.tiny_llama(seed, attention_bias=True)
    if kind == "gpt2":
        return models.tiny_gpt2(seed)
    raise ValueError(kind)


TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"]}


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


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 64, (2, 7), generator=g)
