"""Loading as PEFT does: Hub repo ids (from an offline, pre-filled cache) with revision, subfolder
and cache_dir; eval mode and nothing trainable for `is_trainable=False`; adapter switching that
leaves parameters the user unfroze alone; `save_pretrained(state_dict=...)`."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import make_model, perturb_trainable

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
IDS = torch.tensor([[5, 9, 11, 3, 7]])


def trained(seed=3, **config):
    model = peftkit.get_peft_model(make_model("llama"), peftkit.LoraConfig(**{**CONFIG, **config}))
    return perturb_trainable(model, seed=seed)


def fill_cache(cache, repo_id, revisions):
    """Lay out huggingface_hub's cache: `refs/<rev>` names a snapshot folder of files."""
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    for i, (rev, folders) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        os.makedirs(os.path.join(root, "refs"), exist_ok=True)
        with open(os.path.join(root, "refs", rev), "w") as fh:
            fh.write(commit)
        for sub, src in folders.items():
            shutil.copytree(src, os.path.join(root, "snapshots", commit, sub), dirs_exist_ok=True)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_hub_repo_id_revision_and_subfolder_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first, second = trained(3), trained(4)
    first.save_pretrained(tmp_path / "v1")
    second.save_pretrained(tmp_path / "v2")
    cache = str(tmp_path / "cache")
    fill_cache(cache, "org/adapter", {"main": {"": tmp_path / "v1"},
                                      "v2": {"sub": tmp_path / "v2"}})

    got = peftkit.PeftModel.from_pretrained(make_model("llama"), "org/adapter", cache_dir=cache,
                                            local_files_only=True, token="unused")
    torch.testing.assert_close(logits(got), logits(first), rtol=0, atol=0)
    got = peftkit.PeftModel.from_pretrained(make_model("llama"), "org/adapter", revision="v2",
                                            subfolder="sub", cache_dir=cache,
                                            local_files_only=True)
    torch.testing.assert_close(logits(got), logits(second), rtol=0, atol=0)
    got.load_adapter("org/adapter", "other", cache_dir=cache, local_files_only=True)
    got.set_adapter("other")
    torch.testing.assert_close(logits(got), logits(first), rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="org/missing"):
        peftkit.PeftModel.from_pretrained(make_model("llama"), "org/missing", cache_dir=cache,
                                          local_files_only=True)
    with pytest.raises(TypeError, match="revison"):
        peftkit.PeftModel.from_pretrained(make_model("llama"), "org/adapter", revison="v2")


def test_not_trainable_means_eval_mode_and_no_gradients(tmp_path):
    trained().save_pretrained(tmp_path)
    model = peftkit.PeftModel.from_pretrained(make_model("llama").train(), str(tmp_path))
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    model = peftkit.PeftModel.from_pretrained(make_model("llama"), str(tmp_path),
                                              is_trainable=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if "lora_" in n}


def test_adapter_switching_leaves_hand_unfrozen_parameters_alone(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    norm = model.get_base_model().model.norm.weight
    norm.requires_grad_(True)
    model.add_adapter("b", peftkit.LoraConfig(**CONFIG))
    model.load_adapter(str(tmp_path), "c", is_trainable=True)
    model.set_adapter("b")
    assert norm.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" in n} == {
        n for n in dict(model.named_parameters()) if ".b." in n and "lora_" in n}
    assert not any(".default." in n or ".c." in n for n in trainable)


def test_load_adapter_into_an_existing_name_replaces_its_weights(tmp_path):
    """What transformers' Trainer calls on resume and on load_best_model_at_end."""
    source = trained(5)
    source.save_pretrained(tmp_path)
    model = trained(6)
    model.load_adapter(str(tmp_path), "default", is_trainable=True)
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=0)
    assert all(p.requires_grad for p in model.adapter_tensors("default").values())


def test_save_pretrained_takes_tensors_from_a_given_state_dict(tmp_path):
    """A sharding engine hands over the gathered full state dict: that is what gets saved."""
    model = trained()
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    for key, tensor in model.adapter_tensors("default").items():
        assert torch.equal(saved[key], state[names[id(tensor)]])
    partial = {k: v for k, v in state.items() if "lora_A" not in k}
    with pytest.raises(KeyError, match="lora_A"):
        model.save_pretrained(tmp_path / "x", state_dict=partial)
