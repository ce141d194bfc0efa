"""The seed's path: TRL's `SFTTrainer` training a peftkit LoRA model on prompt/completion rows.

TRL does not know peftkit's `PeftModel`, so it patches its forward with TRL's fused LM-head loss,
which runs `model.base_model(...)` as a backbone; `TunedModel` answers that call as one."""

import os

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from train_fixtures import tiny_model_dir

trl = pytest.importorskip("trl")


def test_sft_trainer_trains_a_peftkit_lora_model(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir(str(tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    before = {k: v.detach().clone() for k, v in model.adapter_tensors("default").items()}
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                         gradient_accumulation_steps=1, max_steps=3, learning_rate=1e-2,
                         report_to="none", logging_steps=1,
                         dataloader_pin_memory=False, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    trainer.train()
    after = model.adapter_tensors("default")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), out)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
