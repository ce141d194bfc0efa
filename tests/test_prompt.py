"""Prompt tuning: interop with the real peft both ways, generation with and without the KV cache,
the rewritten inputs, each init mode, training, save/load, and errors."""

import contextlib
import copy
import io

import peft
import pytest
import torch

import peftkit
from conftest import train_steps, trainer_changes
from peftkit import models
from peftkit.methods.prompt import PromptEncoder

N = 4  # virtual tokens
MAKERS = {"llama": models.tiny_llama, "gpt2": models.tiny_gpt2}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def ours(kind="llama", base=None, **kw):
    cfg = peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **kw)
    return peftkit.get_peft_model(base or MAKERS[kind](), cfg)


def run(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_peft_to_peftkit(kind, batch, tmp_path):
    torch.manual_seed(3)
    ref = peft.get_peft_model(MAKERS[kind](), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()
    ref.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(MAKERS[kind](), tmp_path).eval()
    expected = run(ref, batch, labels=batch["input_ids"])
    got = run(loaded, batch, labels=batch["input_ids"])
    assert got.logits.shape == (2, N + 7, 64)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_peftkit_to_peft(kind, batch, tmp_path):
    torch.manual_seed(4)
    model = ours(kind).eval()
    model.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(MAKERS[kind](), tmp_path).eval()
    torch.testing.assert_close(run(ref, batch).logits, run(model, batch).logits, atol=1e-5, rtol=0)
    # peft's own cached generate drifts on GPT-2 with transformers 5 (it drops position_ids);
    # its uncached one equals step-by-step greedy decoding.
    gen = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **gen),
                           ref.generate(**batch, **gen, use_cache=False))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_generate_with_and_without_cache(kind, batch):
    torch.manual_seed(5)
    model = ours(kind).eval()
    batch["attention_mask"][0, :3] = 0  # left padding: positions come from the mask
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**batch, **gen)
        uncached = model.generate(**batch, **gen, use_cache=False)
    assert cached.shape == (2, 7 + 8)
    assert torch.equal(cached, uncached)


def test_print_trainable_parameters_matches_peft():
    def line(model):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.print_trainable_parameters()
        return buf.getvalue()

    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=N)
    ref = peft.get_peft_model(models.tiny_llama(), peft.PromptTuningConfig(**cfg))
    mine = peftkit.get_peft_model(models.tiny_llama(), peftkit.PromptTuningConfig(**cfg))
    assert line(mine) == line(ref)
    assert line(mine).startswith(f"trainable params: {N * 16} ||")


def test_inputs_the_model_sees():
    """Mask, labels, positions and token types are extended by N as the docstring says."""
    from transformers import BertConfig, BertForTokenClassification

    bert = BertForTokenClassification(BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_labels=2)).eval()
    model = peftkit.get_peft_model(bert, peftkit.PromptTuningConfig(task_type="TOKEN_CLS",
                                                                    num_virtual_tokens=N))
    seen = {}
    model.get_base_model().register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    ids = torch.randint(3, 64, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    types = torch.ones_like(ids)
    positions = torch.arange(5).expand(2, 5)
    out = run(model, dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                          position_ids=positions, labels=torch.ones_like(ids)))
    assert out.logits.shape == (2, N + 5, 2) and out.loss.ndim == 0
    assert seen["input_ids"] is None
    prompt = model.adapter_tensors("default")["prompt_embeddings"]
    embeds = model.get_base_model().get_input_embeddings()(ids)
    assert torch.equal(seen["inputs_embeds"], torch.cat([prompt.expand(2, N, 16), embeds], 1))
    ones, zeros, ignore = torch.ones(2, N), torch.zeros(2, N), torch.full((2, N), -100)
    assert torch.equal(seen["attention_mask"], torch.cat([ones.long(), mask], 1))
    assert torch.equal(seen["token_type_ids"], torch.cat([zeros.long(), types], 1))
    assert torch.equal(seen["labels"], torch.cat([ignore, torch.ones_like(ids)], 1))
    assert torch.equal(seen["position_ids"], torch.arange(N + 5).expand(2, N + 5))


def test_sequence_labels_are_not_padded():
    model = peftkit.get_peft_model(models.tiny_bert(), peftkit.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=N))
    out = run(model, dict(input_ids=torch.randint(3, 64, (2, 5)), labels=torch.tensor([0, 1])))
    assert out.logits.shape == (2, 2) and out.loss.ndim == 0


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "classify": 5, "the": 6, "review": 7},
                              unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("n,ids", [(5, [5, 6, 7, 5, 6]), (2, [5, 6])])
def test_text_init(tokenizer_dir, n, ids):
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
               prompt_tuning_init_text="classify the review", tokenizer_name_or_path=tokenizer_dir)
    model = peftkit.get_peft_model(models.tiny_llama(), peftkit.PromptTuningConfig(**cfg))
    table = model.get_base_model().get_input_embeddings().weight
    prompt = model.adapter_tensors("default")["prompt_embeddings"]
    assert torch.equal(prompt, table[ids])
    ref = peft.get_peft_model(models.tiny_llama(), peft.PromptTuningConfig(**cfg))
    assert torch.equal(prompt, ref.prompt_encoder["default"].embedding.weight)


def test_sample_vocab_and_random_init():
    table = models.tiny_llama().get_input_embeddings().weight
    sampled = ours(prompt_tuning_init="SAMPLE_VOCAB").adapter_tensors("default")
    sampled = sampled["prompt_embeddings"]
    assert all((table == row).all(1).any() for row in sampled)  # every row is a vocabulary row
    # tiny_llama seeds the RNG, so both draw the same numbers: nn.Embedding's N(0, 1), as PEFT
    random = ours(prompt_tuning_init="RANDOM").adapter_tensors("default")["prompt_embeddings"]
    ref = peft.get_peft_model(models.tiny_llama(), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init="RANDOM"))
    assert torch.equal(random, ref.prompt_encoder["default"].embedding.weight)


def test_training_reduces_loss_and_round_trip(batch, tmp_path):
    # initializer_range 0.2: with the default 0.02 the tiny model's logits barely move
    model = ours(base=models.tiny_gpt2(initializer_range=0.2)).train()
    losses = train_steps(model, batch, lr=5e-2)
    assert losses[-1] < 0.95 * losses[0]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.prompt_encoder.embedding.default.weight"]
    model.eval().save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(models.tiny_gpt2(initializer_range=0.2), tmp_path)
    torch.testing.assert_close(run(loaded, batch).logits, run(model, batch).logits, atol=0, rtol=0)


def test_disable_unload_and_merge_error(batch):
    base = run(models.tiny_llama(), batch).logits
    model = ours()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, batch).logits, base, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged.*extra input"):
        model.merge_and_unload()
    plain = model.unload()
    assert not hasattr(plain, "prompt_encoder")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in plain.modules())
    torch.testing.assert_close(run(plain, batch).logits, base, atol=0, rtol=0)


def test_several_prompts(batch):
    model = ours()
    first = run(model, batch).logits
    model.add_adapter("b", peftkit.PromptTuningConfig(num_virtual_tokens=2))
    model.set_adapter("b")
    assert run(model, batch).logits.shape == (2, 2 + 7, 64)
    model.set_adapter("default")
    torch.testing.assert_close(run(model, batch).logits, first, atol=0, rtol=0)


def test_errors(tokenizer_dir):
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        peftkit.PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                   tokenizer_name_or_path=tokenizer_dir)
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peftkit.PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="classify")
    with pytest.raises(ValueError, match="prompt_tuning_init: must be one of"):
        peftkit.PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="ZEROS")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        peftkit.PromptTuningConfig()
    with pytest.raises(ValueError, match="task_type"):
        peftkit.PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_2_SEQ_LM")
    with pytest.raises(ValueError, match="token_dim: is 32"):
        peftkit.get_peft_model(models.tiny_llama(),
                               peftkit.PromptTuningConfig(num_virtual_tokens=N, token_dim=32))
    assert isinstance(ours().get_base_model().prompt_encoder, PromptEncoder)


def test_trains_in_hf_trainer(tmp_path):
    changed, _ = trainer_changes(ours(), tmp_path)
    assert changed == {"base_model.model.prompt_encoder.embedding.default.weight"}


def test_backbone_alone_sees_the_prompt(batch):
    """TRL's fused LM-head loss runs `model.base_model` and the head itself: the backbone call gets
    the prompt and returns the T real positions, equal to the full call's."""
    model = ours().eval()
    full = run(model, batch).logits  # (B, N + T, V)
    inner = model.get_base_model()
    with torch.no_grad():
        hidden = inner.base_model(**batch).last_hidden_state
    assert hidden.shape == (2, 7, 16)
    torch.testing.assert_close(inner.lm_head(hidden), full[:, N:], atol=1e-6, rtol=0)


def test_deepcopy_is_independent(batch):
    model = ours().eval()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(run(twin, batch).logits, run(model, batch).logits, atol=0, rtol=0)
    with torch.no_grad():
        twin.adapter_tensors("default")["prompt_embeddings"].add_(1.0)
    assert (run(twin, batch).logits - run(model, batch).logits).abs().max() > 1e-3


def test_trains_in_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    model = ours()
    before = model.adapter_tensors("default")["prompt_embeddings"].detach().clone()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
        pad_token="<pad>", unk_token="<unk>")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to=[], use_cpu=True,
                         disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                         remove_unused_columns=False)
    data = Dataset.from_dict({"input_ids": [list(range(3, 11)), list(range(20, 30))] * 2})
    trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    assert not torch.equal(model.adapter_tensors("default")["prompt_embeddings"], before)


def test_sequence_classification_interop(tmp_path):
    """SEQ_CLS: the new head trains with the prompt and is saved under PEFT's key."""
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    cfg = dict(task_type="SEQ_CLS", num_virtual_tokens=N)
    ref = peft.get_peft_model(models.tiny_bert(), peft.PromptTuningConfig(**cfg)).eval()
    with torch.no_grad():
        ref.base_model.classifier.modules_to_save["default"].weight.add_(0.5)
    ref.save_pretrained(tmp_path / "peft")
    mine = peftkit.PeftModel.from_pretrained(models.tiny_bert(), tmp_path / "peft").eval()
    expected = run(ref, dict(input_ids=ids)).logits
    torch.testing.assert_close(run(mine, dict(input_ids=ids)).logits, expected, atol=1e-5, rtol=0)
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(models.tiny_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(back, dict(input_ids=ids)).logits, expected, atol=1e-5, rtol=0)
    trainable = peftkit.get_peft_model(models.tiny_bert(), peftkit.PromptTuningConfig(**cfg))
    assert trainable.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
