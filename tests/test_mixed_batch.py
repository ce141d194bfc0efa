"""Mixed-adapter batches (`adapter_names=[...]`, `peftkit.mixed`) against Hugging Face PEFT and
against each adapter run alone: logits, padded batches, greedy and beam generate, refusals."""

import peft
import pytest
import torch

import peftkit
from conftest import make_model, perturb_trainable
from peftkit.methods.lora import LoraLinear

# Three LoRA adapters with different r, scalings and targets; on Llama each trains its own
# lm_head (PEFT 0.21 fails with a KeyError when a row's adapter has no copy of a module_to_save
# that another adapter has; peftkit runs the original module there, see the DoRA test).
MTS = dict(modules_to_save=["lm_head"])
ADAPTERS = {
    "llama": {"a": dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        **MTS),
              "b": dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear", **MTS),
              "c": dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj"], **MTS)},
    "gpt2": {"a": dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["c_attn"],
                       fan_in_fan_out=True),
             "b": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj"],
                       fan_in_fan_out=True),
             "c": dict(r=8, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True)},
}
NAMES = ["a", "__base__", "b", "c", "a", "b"]


def build(kind, tmp_path, extra=None):
    """(peftkit model, PEFT model) holding the same perturbed adapters, in eval mode."""
    configs = dict(ADAPTERS[kind], **(extra or {}))
    ours = None
    for name, kw in configs.items():
        config = peftkit.LoraConfig(init_lora_weights=False, **kw)
        if ours is None:
            ours = peftkit.get_peft_model(make_model(kind), config, adapter_name=name)
        else:
            ours.add_adapter(name, config)
        ours.set_adapter(name)
        perturb_trainable(ours, seed=len(name) + ord(name[0]))
    ours.set_adapter("a")
    ours.eval()
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "a", adapter_name="a")
    for name in list(configs)[1:]:
        ref.load_adapter(tmp_path / name, adapter_name=name)
    return ours, ref.eval()


def batch(kind, rows=len(NAMES), length=7, padding=None):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if padding:  # rows of lengths 7, 4, 6, 2, ...
        for i, n in enumerate(torch.tensor([0, 3, 1, 5, 2, 4])[:rows].tolist()):
            cut = slice(0, n) if padding == "left" else slice(length - n, length)
            ids[i, cut], mask[i, cut] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def alone(model, name, inputs):
    """Logits of the whole batch under one adapter (the bare model for "__base__")."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model(**inputs).logits
        model.set_adapter(name)
        return model(**inputs).logits


def assert_rows_alone(model, names, inputs, mixed):
    """Row i of `mixed` equals row i of the batch run with adapter names[i] alone."""
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], alone(model, name, inputs)[rows],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_equal_peft_and_each_adapter_alone(kind, padding, tmp_path):
    ours, ref = build(kind, tmp_path)
    inputs = batch(kind, padding=padding)
    with torch.no_grad():
        got = ours(**inputs, adapter_names=NAMES).logits
        expected = ref(**inputs, adapter_names=NAMES).logits
        base = make_model(kind)(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[[1]], base[[1]], atol=1e-5, rtol=0)  # "__base__" row
    assert_rows_alone(ours, NAMES, inputs, got)
    for name in "abc":  # each adapter moves its rows: the test can tell them apart
        assert (alone(ours, name, inputs) - base).abs().max() > 1e-2


def test_labels_give_peft_mixed_loss(tmp_path):
    """A forward with labels takes the model's own loss over the mixed logits (not the fused
    one), as PEFT computes it."""
    ours, ref = build("llama", tmp_path)
    inputs = batch("llama", padding="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        got = ours(**inputs, labels=labels, adapter_names=NAMES)
        expected = ref(**inputs, labels=labels, adapter_names=NAMES)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)


def test_each_adapter_runs_once_per_layer_on_its_rows(tmp_path):
    """The cost follows the distinct adapters: per layer, one branch call per adapter, on just
    its rows."""
    ours, _ = build("llama", tmp_path)
    layer = ours.get_base_model().model.layers[0].self_attn.v_proj
    assert isinstance(layer, LoraLinear)
    seen = []
    handles = [layer.lora_A[n].register_forward_hook(
        lambda m, args, out, n=n: seen.append((n, args[0].shape[0]))) for n in ("a", "b")]
    with torch.no_grad():
        ours(**batch("llama"), adapter_names=NAMES)
    for h in handles:
        h.remove()
    assert sorted(seen) == [("a", 2), ("b", 2)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generate_equals_peft_and_each_adapter_alone(kind, tmp_path):
    ours, ref = build(kind, tmp_path)
    inputs = batch(kind, padding="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ours.generate(**inputs, adapter_names=NAMES, **kw)
    torch.testing.assert_close(got, ref.generate(**inputs, adapter_names=NAMES, **kw))
    for name in dict.fromkeys(NAMES):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        if name == "__base__":
            with ours.disable_adapter():
                single = ours.generate(**inputs, **kw)
        else:
            ours.set_adapter(name)
            single = ours.generate(**inputs, **kw)
        torch.testing.assert_close(got[rows], single[rows])
    assert len({tuple(row) for row in got[:, inputs["input_ids"].shape[1]:].tolist()}) > 2


def test_beam_search_repeats_names_per_beam(tmp_path):
    """Each row's beams run its adapter (PEFT repeats the names num_beams times)."""
    ours, ref = build("llama", tmp_path)
    inputs = batch("llama", padding="left")
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2,
              pad_token_id=0)
    got = ours.generate(**inputs, adapter_names=NAMES, **kw)
    torch.testing.assert_close(got, ref.generate(**inputs, adapter_names=NAMES, **kw))
    ours.set_adapter("b")
    rows = [j for i, n in enumerate(NAMES) if n == "b" for j in (2 * i, 2 * i + 1)]
    torch.testing.assert_close(got[rows], ours.generate(**inputs, **kw)[rows])


def test_dora_adapters_mix_where_peft_refuses(tmp_path):
    """peftkit mixes DoRA adapters (each row as the adapter alone); PEFT 0.21 refuses them.
    "d" has no copy of lm_head: its rows use the original one, as when it runs alone."""
    extra = {"d": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"])}
    ours, ref = build("llama", tmp_path, extra)
    names = ["d", "a", "__base__", "d", "b", "c"]
    inputs = batch("llama", padding="left")
    with torch.no_grad():
        got = ours(**inputs, adapter_names=names).logits
    assert_rows_alone(ours, names, inputs, got)
    with pytest.raises(ValueError, match="DoRA"), torch.no_grad():
        ref(**inputs, adapter_names=names)


@pytest.mark.parametrize("case, match", [
    ("training", "training mode"),
    ("unknown", "not loaded"),
    ("length", "one adapter name per row"),
    ("merged", "merged"),
])
def test_refusals_match_peft(case, match, tmp_path):
    ours, ref = build("llama", tmp_path)
    inputs, names = batch("llama"), list(NAMES)
    if case == "training":
        ours.train()
        ref.train()
    elif case == "unknown":
        names[0] = "nope"
    elif case == "length":
        names = names[:-1]
    else:
        ours.merge_adapter(["a"])
        ref.merge_adapter(["a"])
    with pytest.raises(ValueError, match=match), torch.no_grad():
        ours(**inputs, adapter_names=names)
    with pytest.raises(ValueError), torch.no_grad():
        ref(**inputs, adapter_names=names)


@pytest.mark.parametrize("config, method", [
    (peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), "PROMPT_TUNING"),
    (peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "IA3"),
    (peftkit.AdapterConfig(reduction_factor=4), "BOTTLENECK"),
])
@pytest.mark.parametrize("active", [False, True])
def test_refuses_methods_that_cannot_mix(config, method, active, tmp_path):
    """Named in the list, or active (it would apply to every row): refused, naming the method."""
    lora = peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    ours = peftkit.get_peft_model(make_model("llama"), lora, adapter_name="a").eval()
    ours.add_adapter("x", config)
    names = ["a", "__base__"] if active else ["a", "x"]
    if active:
        ours.set_adapter("x")
    with pytest.raises(ValueError, match=f"'x' is a {method} adapter"), torch.no_grad():
        ours(**batch("llama", rows=2), adapter_names=names)


def test_bad_argument_and_no_leak(tmp_path):
    """A string is not a list of names; after a refused or finished call, plain calls are plain."""
    ours, _ = build("llama", tmp_path)
    inputs = batch("llama")
    with pytest.raises(ValueError, match="list of adapter names"):
        ours(**inputs, adapter_names="a")
    with torch.no_grad():
        ours(**inputs, adapter_names=NAMES)
    torch.testing.assert_close(ours(**inputs).logits, alone(ours, "a", inputs), atol=0, rtol=0)
