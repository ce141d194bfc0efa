"""A PeftModel trains inside transformers' Trainer (and TRL's SFTTrainer): the adapter changes,
nothing else does."""

import pytest
import torch
from torch.utils.data import Dataset

import peftkit
from conftest import make_model


class Random(Dataset):
    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("bias", ["none", "all"])
def test_trainer_changes_only_adapter(tmp_path, bias):
    from transformers import Trainer, TrainingArguments

    model = peftkit.get_peft_model(
        make_model("llama"),
        peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05, bias=bias,
                           target_modules=["q_proj", "v_proj", "k_proj", "o_proj"]),
    )
    before = snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Random()).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed(before, model) == trainable
    assert {n for n in trainable if "lora_" not in n} == (
        set() if bias == "none" else {n for n in trainable if n.endswith("bias")}
    )
    assert any("lora_A" in n for n in trainable)


def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset as HFDataset

    model = peftkit.get_peft_model(make_model("llama"),
                                   peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    data = HFDataset.from_dict({"input_ids": [list(range(3, 11)), list(range(20, 30))] * 4})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to=[], use_cpu=True,
                         disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                         remove_unused_columns=False)
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tkm

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tkm.WordLevel({"<pad>": 0, "<unk>": 1},
                                                                           unk_token="<unk>")),
                                  pad_token="<pad>", unk_token="<unk>")
    trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed(before, model) == trainable and trainable
