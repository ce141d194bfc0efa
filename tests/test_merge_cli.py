"""`peftkit merge`'s output folder: refused while another command holds it, replaced whole
(a real `kill -9` at each step of the save leaves the old merge or the new one, and the next merge
cleans up), files with the umask's mode; and the merge check's tolerance follows the compute
dtype (a bf16-compute 4-bit base, as on CUDA, passes; a merge that lost the adapter does not)."""

import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from peftkit import cli, get_peft_model, models
from peftkit.commands import merge
from peftkit.methods.lora import LoraConfig
from test_outdir import hold, kill9, tree
from train_fixtures import tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (hidden 64: bitsandbytes' CPU kernels need in_features >= its block of 64)."""
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    tokenizer = tiny_tokenizer()
    model = models.tiny_llama(0, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              pad_token_id=1, bos_token_id=2, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(model_dir, path, seed, model_max_length):
    """A LoRA adapter with random (non-zero) B, saved with its own tokenizer (whose
    tokenizer_config.json differs by `model_max_length`)."""
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return [make_adapter(model_dir, folder / name, seed, length)
            for name, seed, length in (("a", 1, 100), ("b", 2, 200))]


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_merge_into_a_folder_in_use_is_refused_at_once(adapters, model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    child = hold(out)
    try:
        rc, _, err = run(capsys, "merge", "--adapter", adapters[0], "--model", model_dir,
                         "--output-dir", out)
    finally:
        kill9(child)
    assert rc == 2 and f"in use by `test holder` (pid {child.pid}" in err, err
    assert not out.exists()


CRASH = """
import os, signal, sys
from transformers import PreTrainedTokenizerBase
from peftkit import cli, outdir

point, *argv = sys.argv[1:]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if point == "saving":  # the weights and config are written, the tokenizer not
    PreTrainedTokenizerBase.save_pretrained = die
if point == "before-swap":
    outdir._replace = die
if point == "after-swap":
    exchange = outdir._exchange
    outdir._exchange = lambda a, b: exchange(a, b) and die()
sys.exit(cli.main(argv))
"""


@pytest.mark.parametrize("point, survivor", [
    ("saving", "old"), ("before-swap", "old"), ("after-swap", "new")])
def test_merge_overwrite_killed_mid_save_leaves_old_or_new(point, survivor, adapters, model_dir,
                                                           tmp_path, capsys):
    parent = tmp_path / "out"
    out, reference = parent / "merged", tmp_path / "reference"
    for adapter, folder in zip(adapters, (out, reference)):
        rc, _, err = run(capsys, "merge", "--adapter", adapter, "--model", model_dir,
                         "--output-dir", folder)
        assert rc == 0, err
    old, new = tree(out), tree(reference)
    assert {name for name in old if old[name] != new.get(name)} >= {
        "model.safetensors", "tokenizer_config.json"}
    argv = ["merge", "--adapter", adapters[1], "--model", model_dir, "--output-dir", out,
            "--overwrite"]
    child = subprocess.run([sys.executable, "-c", CRASH, point, *map(str, argv)],
                           capture_output=True, timeout=300)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert tree(out) == (old if survivor == "old" else new)
    assert len(os.listdir(parent)) > 1  # the killed merge's lock and temporary folder

    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    assert tree(out) == new and os.listdir(parent) == ["merged"]


def test_merged_files_follow_the_umask(adapters, model_dir, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        rc, _, err = run(capsys, "merge", "--adapter", adapters[0], "--model", model_dir,
                         "--output-dir", tmp_path / "merged")
    finally:
        os.umask(previous)
    assert rc == 0, err
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "merged" / name).st_mode)
             for name in os.listdir(tmp_path / "merged")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE(os.stat(tmp_path / "merged").st_mode) == 0o750


def test_tolerance_is_set_by_the_coarsest_compute_dtype():
    assert merge.tolerance({torch.float32}) == 1e-4
    assert merge.tolerance({torch.float32, torch.bfloat16}) == 8 * 2**-7
    assert merge.tolerance({torch.float16, torch.float32}) == 8 * 2**-10


@pytest.fixture
def bf16_compute(monkeypatch):
    """Load 4-bit bases as `peftkit merge --dequantize` does on CUDA: bf16 compute."""
    pytest.importorskip("bitsandbytes")
    from peftkit.quant import bnb_config

    monkeypatch.setattr(merge, "kbit_load_kwargs", lambda quant_type: {
        "quantization_config": bnb_config(quant_type, compute_dtype=torch.bfloat16),
        "device_map": "cpu"})


def test_dequantize_merge_of_a_bf16_compute_base_passes_the_check(
        bf16_compute, adapters, model_dir, tmp_path, capsys):
    rc, out, err = run(capsys, "merge", "--adapter", adapters[0], "--model", model_dir,
                       "--dequantize", "--output-dir", tmp_path / "merged")
    assert rc == 0, err
    relative = float(re.search(r"\(([-+.e\d]+) of the largest logit; limit 6e-02\)", out)[1])
    assert relative > 1e-4  # bf16 rounding: over fp32's limit, which refused this merge before


def test_a_merge_that_lost_the_adapter_is_refused_and_nothing_is_saved(
        bf16_compute, adapters, model_dir, tmp_path, capsys, monkeypatch):
    from peftkit.model import PeftModel

    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self, **kwargs: self.unload())
    rc, _, err = run(capsys, "merge", "--adapter", adapters[0], "--model", model_dir,
                     "--dequantize", "--output-dir", tmp_path / "merged")
    assert rc == 2 and "differ from the adapted model's" in err and "over 6e-02" in err, err
    assert os.listdir(tmp_path) == []
