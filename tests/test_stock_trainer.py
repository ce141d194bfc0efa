"""The seed's recipe in the user's own code: get_peft_model, then a stock transformers `Trainer`
or TRL `SFTTrainer` with DEFAULT checkpointing (save_strategy "steps"), on a tied and an untied
model. Every checkpoint holds the adapter in PEFT's layout and nothing of the base model; PEFT
loads it; resume, best-model loading, label smoothing and gradient checkpointing behave as they do
for a PEFT model."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import peftkit
from peftkit import models

TIED = {"tied": True, "untied": False}
LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05, bias="none",
            target_modules=["q_proj", "v_proj", "k_proj", "o_proj"])
CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                    "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def base(tied: bool):
    return models.tiny_llama(0, tie_word_embeddings=tied)


def peft_model(tied: bool, **lora):
    return peftkit.get_peft_model(base(tied), peftkit.LoraConfig(**{**LORA, **lora}))


def rows(n=24, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (n, length),
                                                                      generator=g)]


def arguments(out, **kw):
    """Defaults everywhere but the size of the run (save_strategy stays "steps")."""
    kw = {"max_steps": 6, "save_steps": 3, "per_device_train_batch_size": 4,
          "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "report_to": "none",
          "use_cpu": True, "disable_tqdm": True, "seed": 7, **kw}
    return TrainingArguments(output_dir=str(out), **kw)


def adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_tensors("default").items()}


class StopAt(TrainerCallback):
    """Ends training after step `step` (after that step's checkpoint): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("tie", TIED)
def test_default_checkpoints_hold_the_adapter_in_peft_layout(tmp_path, tie):
    from peft import PeftModel as PeftPeftModel

    model = peft_model(TIED[tie])
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=rows())
    trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-6"]
    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        assert set(os.listdir(folder)) == CHECKPOINT_FILES
        saved = load_file(folder / "adapter_model.safetensors")
        assert set(saved) == set(model.adapter_tensors("default"))
    final = tmp_path / "checkpoint-6"
    for key, value in load_file(final / "adapter_model.safetensors").items():
        assert torch.equal(value, model.adapter_tensors("default")[key])
    reference = PeftPeftModel.from_pretrained(base(TIED[tie]), str(final)).eval()
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits,
                                   model.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)

    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} == set(
        os.listdir(tmp_path / "final"))


@pytest.mark.parametrize("tie", TIED)
def test_resume_reaches_the_uninterrupted_adapter(tmp_path, tie):
    whole = peft_model(TIED[tie])
    Trainer(model=whole, args=arguments(tmp_path / "a"), train_dataset=rows()).train()

    first = peft_model(TIED[tie])
    Trainer(model=first, args=arguments(tmp_path / "b"), train_dataset=rows(),
            callbacks=[StopAt(3)]).train()
    assert os.listdir(tmp_path / "b") == ["checkpoint-3"]
    resumed = peft_model(TIED[tie])
    Trainer(model=resumed, args=arguments(tmp_path / "b"),
            train_dataset=rows()).train(resume_from_checkpoint=True)
    halfway = adapter(first)
    assert not any(torch.equal(v, adapter(resumed)[k]) for k, v in halfway.items() if "lora_B" in k)
    want, got = adapter(whole), adapter(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in resumed.adapter_tensors("default").values())


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    """The metric is eval_loss with greater_is_better: as training lowers the loss on these rows,
    the best checkpoint is the first, not the last."""
    model = peft_model(True)
    data = rows(8)
    args = arguments(tmp_path, max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps",
                     load_best_model_at_end=True, metric_for_best_model="eval_loss",
                     greater_is_better=True, save_total_limit=None)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert losses[0] == max(losses[:3]) and losses[0] > losses[2]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    now = model.adapter_tensors("default")
    assert all(torch.equal(now[k], best[k]) for k in best)
    assert not all(torch.equal(now[k], last[k]) for k in last)


def test_label_smoothing_is_shifted_as_for_a_causal_lm(tmp_path):
    """Trainer's smoothed loss equals the closed form over next-token targets."""
    eps = 0.1
    model = peft_model(True, lora_dropout=0.0)
    trainer = Trainer(model=model, args=arguments(tmp_path, label_smoothing_factor=eps),
                      train_dataset=rows())
    batch = {k: torch.stack([r[k] for r in rows(2)]) for k in ("input_ids", "labels")}
    got = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logp = model(input_ids=batch["input_ids"]).logits[:, :-1].log_softmax(-1)
    target = batch["labels"][:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    want = (1 - eps) * nll.mean() + eps * (-logp.mean(-1)).mean()
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, reentrant):
    """Recomputation changes no gradient (dropout off), so the adapters agree with a run without
    checkpointing to fp32 rounding; a reentrant checkpoint that got no input gradients would leave
    them untouched."""
    fields = TrainingArguments.__dataclass_fields__
    flag = next(n for n in ("activation_checkpointing", "gradient_checkpointing") if n in fields)
    results = []
    for checkpointing in (False, True):
        model = peft_model(True, lora_dropout=0.0, init_lora_weights="gaussian")
        args = arguments(tmp_path / str(checkpointing), max_steps=2,
                         **{flag: checkpointing,
                            f"{flag}_kwargs": {"use_reentrant": reentrant}})
        Trainer(model=model, args=args, train_dataset=rows()).train()
        results.append(adapter(model))
    plain, checkpointed = results
    start = adapter(peft_model(True, lora_dropout=0.0, init_lora_weights="gaussian"))
    assert all(not torch.equal(checkpointed[k], start[k]) for k in start if "lora_B" in k)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_transformers_unchanged_for_other_models(tmp_path):
    """A plain PreTrainedModel still saves as one (model.safetensors + config.json)."""
    from transformers.trainer_utils import _is_peft_model

    model = base(True)
    assert not _is_peft_model(model)
    Trainer(model=model, args=arguments(tmp_path, max_steps=1, save_steps=1),
            train_dataset=rows(8)).train()
    assert {"model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "checkpoint-1"))
    assert not os.path.exists(tmp_path / "checkpoint-1" / "adapter_model.safetensors")


def test_sft_trainer_default_checkpoints_and_resume(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_fixtures import tiny_model_dir

    path = tiny_model_dir(str(tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": str(a + b)}
                              for a in range(4) for b in range(4)])

    def run(out, **kw):
        torch.manual_seed(0)  # the same LoRA initialization in every run
        model = peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                       peftkit.LoraConfig(**LORA))
        args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                             save_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=3)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                                 processing_class=tokenizer, callbacks=kw.pop("callbacks", None))
        trainer.train(**kw)
        return model

    whole = run(tmp_path / "a")
    for step in (2, 4):
        files = set(os.listdir(tmp_path / "a" / f"checkpoint-{step}"))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not files & {"model.safetensors", "config.json"}
    run(tmp_path / "b", callbacks=[StopAt(2)])
    resumed = run(tmp_path / "b", resume_from_checkpoint=True)
    want, got = adapter(whole), adapter(resumed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_seed_recipe_on_the_embedded_smollm2(tmp_path):
    """The seed's code on the real tied-embedding model: SFTTrainer with default checkpointing;
    the checkpoint is the adapter alone (7.4 MB), equal to the trained tensors, and PEFT loads it
    to the logits peftkit loads it to. bf16 is off: on CPUs without AVX512-BF16 its matmuls are
    ~20x slower; the tiny SFTTrainer test above runs SFTConfig's default bf16."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel as PeftPeftModel

    model, tokenizer = models.load_default()
    lora_config = peftkit.LoraConfig(task_type=peftkit.TaskType.CAUSAL_LM, r=16, lora_alpha=32,
                                     target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                                     lora_dropout=0.05, bias="none")
    model = peftkit.get_peft_model(model, lora_config)
    data = Dataset.from_list([{"prompt": f"Code for day {d}?", "completion": f"D-{d:03d}"}
                              for d in range(8)])
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=2e-4,
                         max_length=32, report_to="none", use_cpu=True, disable_tqdm=True,
                         bf16=False)
    trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    folder = tmp_path / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    assert not {"model.safetensors", "config.json"} & set(os.listdir(folder))
    saved = load_file(folder / "adapter_model.safetensors")
    trained = model.adapter_tensors("default")
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert sum(t.numel() for t in saved.values()) == 1_843_200
    reference = PeftPeftModel.from_pretrained(models.load_default()[0], str(folder)).eval()
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits,
                                   model.get_base_model().eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("imports", [
    "import transformers.trainer; import peftkit",
    "import peftkit; from transformers import Trainer",
    "import peftkit, importlib.util; importlib.util.find_spec('transformers.trainer'); "
    "from transformers import Trainer",
])
def test_trainer_is_taught_whatever_the_import_order(imports):
    """The patch lands whether transformers' Trainer is imported before peftkit or after it, and
    a mere find_spec lookup of it in between does not use the import hook up."""
    import subprocess
    import sys

    check = ("; import transformers.trainer as t, transformers.trainer_utils as u, peftkit.models; "
             "m = peftkit.get_peft_model(peftkit.models.tiny_llama(0), "
             "peftkit.LoraConfig(r=2, target_modules=['q_proj'])); "
             "print(t._is_peft_model(m), u._is_peft_model(m), "
             "t.Trainer._save.__module__, t._is_peft_model(m.get_base_model()))")
    out = subprocess.run([sys.executable, "-c", imports + check], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "peftkit.hf_trainer", "False"]
