"""peftkit reads PEFT's adapter_config.json fail-closed, checked against the installed peft: every
field of each peft config class peftkit reads is implemented (with peft's default) or listed with
peft's default, a file from peft with its defaults loads, and any other value is refused by name."""

import dataclasses
import json
import warnings

import peft
import pytest
from peft.tuners.lora import config as peft_lora

import peftkit
from peftkit.config import PeftConfig

CLASSES = [(peft.LoraConfig, peftkit.LoraConfig), (peft.IA3Config, peftkit.IA3Config),
           (peft.PromptTuningConfig, peftkit.PromptTuningConfig)]
# The smallest valid config of each method, as keyword arguments both libraries accept.
MINIMAL = {
    peftkit.LoraConfig: dict(target_modules=["q_proj", "v_proj"]),
    peftkit.IA3Config: dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    peftkit.PromptTuningConfig: dict(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


def default(f: dataclasses.Field):
    """A dataclass field's default as adapter_config.json holds it."""
    value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True)  # str enums become their value; 0 stays unlike false


def saved_by_peft(tmp_path, peft_cls, **kwargs) -> dict:
    peft_cls(**kwargs).save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def refused(data, *fields):
    """Assert that peftkit refuses `data`, naming each of `fields` and saying what to do."""
    with pytest.raises((NotImplementedError, ValueError)) as err:
        PeftConfig.from_dict(data)
    for name in fields:
        assert name in str(err.value)
    assert "Hugging Face PEFT" in str(err.value)


@pytest.mark.parametrize("peft_cls, ours", CLASSES, ids=lambda c: c.__name__)
def test_every_peft_field_is_implemented_or_listed_with_its_default(peft_cls, ours):
    """A field a future peft adds (or a default it changes) fails here, not silently at load."""
    our_fields = {f.name: f for f in dataclasses.fields(ours)}
    problems = []
    for f in dataclasses.fields(peft_cls):
        if f.name == "peft_type" or f.name in ours.METADATA_KEYS:
            continue
        if f.name in our_fields:
            if default(our_fields[f.name]) != default(f):
                problems.append(f"{f.name}: peftkit's default {default(our_fields[f.name])}, "
                                f"peft's {default(f)}")
        elif f.name not in ours.UNSUPPORTED_DEFAULTS:
            problems.append(f"{f.name}: neither implemented nor in UNSUPPORTED_DEFAULTS")
        elif json.dumps(ours.UNSUPPORTED_DEFAULTS[f.name], sort_keys=True) != default(f):
            problems.append(f"{f.name}: listed as {ours.UNSUPPORTED_DEFAULTS[f.name]!r}, "
                            f"peft's default is {default(f)}")
    peft_names = {f.name for f in dataclasses.fields(peft_cls)}
    problems += [f"{n}: not a peft field" for n in (set(our_fields) | set(ours.UNSUPPORTED_DEFAULTS)
                                                   | ours.METADATA_KEYS) - peft_names]
    problems += [f"{n}: implemented and listed" for n in set(our_fields) & set(ours.UNSUPPORTED_DEFAULTS)]
    assert not problems


@pytest.mark.parametrize("peft_cls, ours", CLASSES, ids=lambda c: c.__name__)
def test_peft_file_with_defaults_loads_without_warning(peft_cls, ours, tmp_path):
    data = saved_by_peft(tmp_path, peft_cls, **MINIMAL[ours])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded == ours(**{k: data[k] for k in MINIMAL[ours]})  # the rest: defaults


def changed(value):
    """A JSON value other than `value`, of a plausible shape."""
    if value is None:
        return [0]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2
    if isinstance(value, str):
        return value + ".other"
    return {k: changed(v) for k, v in value.items()} if value else {"enabled": True}


@pytest.mark.parametrize("key", sorted(peftkit.LoraConfig.UNSUPPORTED_DEFAULTS))
def test_each_unsupported_lora_field_off_its_default_is_refused(key, tmp_path):
    data = saved_by_peft(tmp_path, peft.LoraConfig, **MINIMAL[peftkit.LoraConfig])
    data[key] = changed(peftkit.LoraConfig.UNSUPPORTED_DEFAULTS[key])
    refused(data, key)


# peft 0.21.2's LoRA variants and features as peft itself writes them; loftq needs scipy.
VARIANTS = {
    "lora_bias": dict(lora_bias=True),
    "use_qalora": dict(use_qalora=True),
    "layer_replication": dict(layer_replication=[[0, 2]]),
    "trainable_token_indices": dict(trainable_token_indices=[0, 1]),
    "target_parameters": dict(target_parameters=["mlp.experts.gate_up_proj"]),
    "alora_invocation_tokens": dict(task_type="CAUSAL_LM", alora_invocation_tokens=[5, 6]),
    "arrow_config": dict(arrow_config=peft_lora.ArrowConfig()),
    "use_bdlora": dict(use_bdlora=peft_lora.BdLoraConfig()),
    "velora_config": dict(velora_config=peft_lora.VeloraConfig()),
    "monteclora_config": dict(monteclora_config=peft_lora.MontecloraConfig()),
    "kasa_config": dict(kasa_config=peft_lora.KasaConfig()),
    "eva_config": dict(init_lora_weights="eva", eva_config=peft_lora.EvaConfig()),
    "corda_config": dict(init_lora_weights="corda", corda_config=peft_lora.CordaConfig()),
    "lora_ga_config": dict(init_lora_weights="lora_ga", lora_ga_config=peft_lora.LoraGAConfig()),
    "megatron_config": dict(megatron_config={"tensor_model_parallel_size": 1}),
    "ensure_weight_tying": dict(ensure_weight_tying=True, modules_to_save=["lm_head"]),
    "init_lora_weights": dict(init_lora_weights="mica"),
}


@pytest.mark.parametrize("field", list(VARIANTS))
def test_peft_lora_variants_are_refused(field, tmp_path):
    refused(saved_by_peft(tmp_path, peft.LoraConfig, target_modules=["q_proj"], **VARIANTS[field]),
            field)


@pytest.mark.parametrize("init", ["orthogonal"])
def test_other_peft_inits_are_refused(init, tmp_path):
    refused(saved_by_peft(tmp_path, peft.LoraConfig, target_modules=["q_proj"],
                          init_lora_weights=init), "init_lora_weights")


@pytest.mark.parametrize("field, kwargs", [
    ("task_type", dict(task_type="SEQ_2_SEQ_LM")),
    ("num_transformer_submodules", dict(task_type="CAUSAL_LM", num_transformer_submodules=2)),
])
def test_encoder_decoder_prompts_are_refused(field, kwargs, tmp_path):
    refused(saved_by_peft(tmp_path, peft.PromptTuningConfig, num_virtual_tokens=4, **kwargs), field)


def test_json_types_are_strict(tmp_path):
    """0 is not false: a value only equal to the default under Python's == is still refused."""
    data = saved_by_peft(tmp_path, peft.LoraConfig, **MINIMAL[peftkit.LoraConfig])
    refused({**data, "use_qalora": 0}, "use_qalora")
    refused({**data, "qalora_group_size": 16.0}, "qalora_group_size")
    with pytest.raises(ValueError, match="use_dora: must be True or False"):
        PeftConfig.from_dict({**data, "use_dora": 0})


def test_peft_dora_file_loads_as_dora(tmp_path):
    """use_dora is implemented (tests/test_dora.py): peft's DoRA config loads, not refused."""
    data = saved_by_peft(tmp_path, peft.LoraConfig, target_modules=["q_proj"], use_dora=True)
    assert PeftConfig.from_dict(data) == peftkit.LoraConfig(target_modules=["q_proj"],
                                                            use_dora=True)


@pytest.mark.parametrize("peft_cls, ours", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [True, 0, "x", [1], {"enabled": False}])
def test_unknown_key_with_a_value_is_refused(peft_cls, ours, value, tmp_path):
    data = saved_by_peft(tmp_path, peft_cls, **MINIMAL[ours])
    refused({**data, "future_feature": value}, "future_feature")


@pytest.mark.parametrize("value", [None, False, [], {}])
def test_unknown_key_left_unset_is_ignored_with_a_warning(value, tmp_path):
    data = saved_by_peft(tmp_path, peft.LoraConfig, **MINIMAL[peftkit.LoraConfig])
    with pytest.warns(UserWarning, match="future_feature"):
        loaded = PeftConfig.from_dict({**data, "future_feature": value})
    assert loaded == peftkit.LoraConfig(target_modules=data["target_modules"])


def test_refusal_names_every_offending_field(tmp_path):
    data = saved_by_peft(tmp_path, peft.LoraConfig, target_modules=["q_proj"], lora_bias=True,
                         layer_replication=[[0, 2]])
    refused({**data, "future_feature": 1}, "lora_bias", "layer_replication", "future_feature")


@pytest.mark.parametrize("peft_cls, kwargs", [
    (peft.LoHaConfig, dict(target_modules=["q_proj"])),
    (peft.PrefixTuningConfig, dict(task_type="CAUSAL_LM", num_virtual_tokens=4)),
], ids=["LoHa", "PrefixTuning"])
def test_other_peft_methods_are_refused(peft_cls, kwargs, tmp_path):
    refused(saved_by_peft(tmp_path, peft_cls, **kwargs), "peft_type")
