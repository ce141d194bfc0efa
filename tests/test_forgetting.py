"""Forgetting (`train.forgetting`): KL against a hand-computed case, exactly 0 for an untouched
model, positive after a change; the adapters-disabled base equals a separate untouched copy;
batched greedy answers equal one-at-a-time ones (`train.evaluate`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import perturb_trainable
from peftkit import LoraConfig, get_peft_model
from peftkit.train import forgetting
from peftkit.train.evaluate import generate_batch, generate_ids
from peftkit.train.loading import load_model, load_tokenizer


def test_kl_sum_matches_the_closed_form_and_skips_unweighted_positions():
    base = torch.log(torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]))
    tuned = torch.log(torch.tensor([[[0.9, 0.1], [0.7, 0.3]]]))
    total, count = forgetting.kl_sum(base, tuned, torch.tensor([[1.0, 0.0]]))
    assert count == 1
    assert total == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    total, _ = forgetting.kl_sum(base, tuned, torch.tensor([[0.0, 1.0]]))
    assert total == pytest.approx(0.2 * math.log(0.2 / 0.7) + 0.8 * math.log(0.8 / 0.3), rel=1e-6)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(model_dir).eval(), load_tokenizer(model_dir)


def test_untouched_model_has_zero_forgetting_and_a_changed_one_positive(tiny):
    base, tokenizer = tiny
    assert forgetting.measure(base, tokenizer, copy.deepcopy(base)) == 0.0
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "v_proj"]))
    peft.eval()
    assert forgetting.measure(peft, tokenizer) == 0.0  # B = 0 at init: no drift
    perturb_trainable(peft, scale=0.5)
    drift = forgetting.measure(peft, tokenizer)
    assert drift > 1e-3
    # disabling the adapters gives the base model: the same as comparing with a separate copy
    assert forgetting.measure(peft, tokenizer, base) == pytest.approx(drift, rel=1e-5)


def test_batched_greedy_answers_equal_one_at_a_time(tiny):
    base, tokenizer = tiny
    prompts = [forgetting.prompt_ids(q, tokenizer) for q in forgetting.questions()[:6]]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    batched = generate_ids(base, tokenizer, prompts, 12)
    single = [generate_ids(base, tokenizer, [p], 12)[0] for p in prompts]
    assert batched == single
    assert generate_batch(base, tokenizer, prompts, 12) == [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in single]


def test_fresh_pissa_model_has_zero_forgetting(tiny, model_dir):
    """A PiSSA init moves part of the base into the adapter, so the disabled adapter is the
    residual base, not the untouched model: `peftkit train --forgetting` reloads the untouched
    model for such an init (`run._forgetting`), and right after init the drift is 0."""
    import argparse

    from peftkit.train import run

    base, tokenizer = tiny
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    peft = get_peft_model(copy.deepcopy(base), config).eval()
    args = argparse.Namespace(model=model_dir, eval_batch_size=None, batch_size=8)
    assert forgetting.measure(peft, tokenizer) > 1e-5  # against the residual base
    kl = run._forgetting(peft, tokenizer, args, {"dtype": torch.float32}, config)
    assert abs(kl) < 1e-6  # fp32 rounding of the residual only
