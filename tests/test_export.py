"""`peftkit export` and `peftkit doctor --adapter` on a tiny Llama (hidden 64, 4 heads, 2 KV heads).

Each export is read back the way its consumer reads it and compared with peftkit's own math:
- gguf-lora: llama.cpp's rule, delta = B @ A * adapter.lora.alpha / r with r from the pair
  (llama-adapter.h `get_scale`), q/k rows un-permuted with transformers' GGUF reader
  (`LlamaTensorProcessor._reverse_permute_weights`), against `LoraLinear.delta_weight`;
- gguf: every tensor of the merged GGUF, un-permuted, against peftkit's `merge_and_unload`;
- vllm: vLLM's rules (listed at VLLM_RULES) against the folder and peftkit's deltas.
The base GGUF is written here as llama.cpp's converter writes one (f32, q/k rows permuted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from peftkit import AdapterConfig, IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from peftkit.cli import main
from peftkit.methods.lora import LoraLinear
from peftkit.models import tiny_llama

N_HEAD, N_KV = 4, 2
DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=N_HEAD,
            num_key_value_heads=N_KV)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
UNPERMUTE = LlamaTensorProcessor(config={"num_attention_heads": N_HEAD,
                                         "num_key_value_heads": N_KV}).process
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (the test's oracle for the base)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_base_gguf(model, path: str) -> str:
    """The model as llama.cpp's converter writes it: f32, q/k rows permuted, ChatML template."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(model.config.num_hidden_layers)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_embedding_length(model.config.hidden_size)
    w.add_token_list([f"t{i}" for i in range(model.config.vocab_size)])
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # a tied head is not in the checkpoint; llama.cpp reuses token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        data = t.float().numpy()
        if ".attn_q." in name:
            data = llamacpp_permute(data, N_HEAD)
        elif ".attn_k." in name:
            data = llamacpp_permute(data, N_KV)
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """GGUF tensors dequantized to float32, numpy shape, q/k rows back in Hugging Face order."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        data = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        if ".lora_a" not in t.name:
            data = UNPERMUTE(data.astype(np.float32), t.name).weights
        out[t.name] = data.astype(np.float32)
    return out


def fields(path: str) -> dict:
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()
            if not f.name.startswith("GGUF.")}


def make_adapter(tmp_path, config, seed=0, name="adapter", **dims):
    """(peft model, adapter dir, base GGUF) with random non-zero adapter weights."""
    model = tiny_llama(**{**DIMS, **dims})
    base = write_base_gguf(model, str(tmp_path / "base.gguf"))
    pm = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / name))
    return pm, str(tmp_path / name), base


def lora_layers(pm) -> dict[str, LoraLinear]:
    """Module path as in the adapter file (model.layers.0.self_attn.q_proj) -> layer."""
    return {n.removeprefix("base_model.model."): m
            for n, m in pm.named_modules() if isinstance(m, LoraLinear)}


def gguf_name(path: str) -> str:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    return names.get_name(path + ".weight", try_suffixes=(".weight",))


def export(*args) -> int:
    return main(["export", *map(str, args)])


LORA = dict(r=8, lora_alpha=16, target_modules=TARGETS)
FOLDS = {
    "plain": {},
    "rslora": dict(use_rslora=True),
    "patterns": dict(rank_pattern={r"layers\.1\.self_attn\.q_proj": 4, "down_proj": 2},
                     alpha_pattern={"v_proj": 5.0, r"layers\.0\.self_attn\.k_proj": 40.0}),
    "all": dict(use_rslora=True, rank_pattern={"o_proj": 16}, alpha_pattern={"q_proj": 3.0}),
}


# ---------------------------------------------------------------- gguf-lora


@pytest.mark.parametrize("case", FOLDS)
def test_gguf_lora_deltas_are_peftkits_under_llamacpp_scaling(tmp_path, case):
    pm, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA, **FOLDS[case]))
    assert export("--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "out",
                  "--base-gguf", base, "--outtype", "f32") == 0
    path = str(tmp_path / "out" / "adapter.gguf")
    meta = fields(path)
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == (
        "adapter", "lora", "llama")
    alpha = meta["adapter.lora.alpha"]
    assert alpha == 16
    tensors = read_tensors(path)
    layers = lora_layers(pm)
    assert len(tensors) == 2 * len(layers) == 2 * 2 * len(TARGETS)
    naive_wrong = 0
    for module, layer in layers.items():
        name = gguf_name(module)
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        r = b.shape[1]  # llama.cpp: rank = lora_b->ne[0]
        assert a.shape == (r, layer.base_layer.in_features)
        delta = b @ a * (alpha / r)
        expected = layer.delta_weight("default").detach().numpy()
        np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-7)
        # what llama.cpp's own converter writes (B unfolded) differs wherever a fold applies
        plain = layer.lora_B["default"].weight.detach().numpy() @ a * (alpha / r)
        naive_wrong += not np.allclose(plain, expected, rtol=1e-3)
    assert (naive_wrong > 0) == (case != "plain")
    if case == "plain":  # nothing folded: the tensors are the adapter's, bit for bit
        saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        a = saved["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].numpy()
        assert np.array_equal(tensors["blk.0.attn_v.weight.lora_a"], a)


@pytest.mark.parametrize("outtype,kind,limit", [("f16", "F16", 1e-3), ("bf16", "BF16", 8e-3),
                                                ("q8_0", "Q8_0", 1e-2)])
def test_gguf_lora_outtypes(tmp_path, outtype, kind, limit):
    pm, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA))
    assert export("--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "out",
                  "--base-gguf", base, "--outtype", outtype) == 0
    path = str(tmp_path / "out" / "adapter.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == kind  # rows of 64 values
    # q8_0 blocks hold 32 values: B's rows of r = 8 fall back to f16, as in llama.cpp's converter
    assert types["blk.0.attn_q.weight.lora_b"] == ("F16" if outtype == "q8_0" else kind)
    tensors = read_tensors(path)
    for module, layer in lora_layers(pm).items():
        name = gguf_name(module)
        delta = tensors[name + ".lora_b"] @ tensors[name + ".lora_a"] * 2.0
        expected = layer.delta_weight("default").detach().numpy()
        assert np.abs(delta - expected).max() / np.abs(expected).max() < limit


def test_gguf_lora_modelfile_points_at_base_and_adapter(tmp_path):
    _, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA))
    export("--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "out",
           "--base-gguf", base)
    text = (tmp_path / "out" / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[:2] == [f"FROM {base}", "ADAPTER ./adapter.gguf"]
    assert "<|im_start|>assistant" in text  # ChatML detected in tokenizer.chat_template
    assert lines[-1] == 'PARAMETER stop "t2"'  # the eos token of the GGUF's vocabulary


# ---------------------------------------------------------------- gguf (merged)


@pytest.mark.parametrize("case", ["plain", "all"])
def test_merged_gguf_is_peftkits_merge(tmp_path, case):
    pm, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA, **FOLDS[case]))
    assert export("--adapter", adapter, "--format", "gguf", "--out", tmp_path / "out",
                  "--base-gguf", base, "--outtype", "f32") == 0
    path = str(tmp_path / "out" / "model.gguf")
    merged = pm.merge_and_unload().state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    tensors = read_tensors(path)
    assert len(tensors) == len(merged)
    for key, w in merged.items():
        np.testing.assert_allclose(tensors[names.get_name(key, try_suffixes=(".weight",))],
                                   w.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    meta, base_meta = fields(path), fields(base)
    assert meta.pop("general.file_type") == 0  # ALL_F32
    assert meta == base_meta  # hyper-parameters, vocabulary, chat template carried over
    modelfile = (tmp_path / "out" / "Modelfile").read_text().splitlines()
    assert modelfile[0] == "FROM ./model.gguf" and not modelfile[1].startswith("ADAPTER")


def test_merged_gguf_carries_modules_to_save_and_unties_a_lora_head(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                        modules_to_save=["embed_tokens"])
    pm, adapter, base = make_adapter(tmp_path, config, tie_word_embeddings=True)
    assert "output.weight" not in read_tensors(base)  # tied: llama.cpp reuses token_embd
    assert export("--adapter", adapter, "--format", "gguf", "--out", tmp_path / "out",
                  "--base-gguf", base, "--outtype", "f32") == 0
    tensors = read_tensors(str(tmp_path / "out" / "model.gguf"))
    lora_head = lora_layers(pm)["lm_head"]
    embed = pm.base_model.model.model.embed_tokens  # the trained copy that modules_to_save saves
    trained = embed(torch.arange(64)).detach().numpy()
    np.testing.assert_allclose(tensors["token_embd.weight"], trained, atol=1e-6)
    base_embed = read_tensors(base)["token_embd.weight"]
    assert not np.allclose(trained, base_embed)
    head = base_embed + lora_head.delta_weight("default").detach().numpy()
    np.testing.assert_allclose(tensors["output.weight"], head, rtol=1e-5, atol=1e-6)


def test_merged_gguf_q8_0_stays_close(tmp_path):
    pm, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA))
    assert export("--adapter", adapter, "--format", "gguf", "--out", tmp_path / "out",
                  "--base-gguf", base, "--outtype", "q8_0") == 0
    path = str(tmp_path / "out" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    tensors = read_tensors(path)
    w = pm.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(tensors["blk.0.attn_q.weight"] - w).max() / np.abs(w).max() < 1e-2


# ---------------------------------------------------------------- vllm

# vLLM's rules for a LoRA adapter folder, from vllm/lora/peft_helper.py (PEFTHelper, vLLM 0.9.x,
# commit e745baf) and vllm/config/lora.py (LoRAConfig, vLLM 0.11.x, commit a78dc92):
# 1. adapter_config.json must have r, lora_alpha and target_modules (PEFTHelper.from_dict);
#    every key that is not a PEFTHelper field is dropped: rank_pattern and alpha_pattern are
#    ignored.
# 2. modules_to_save must be None ("vLLM only supports modules_to_save being None").
# 3. use_dora must be false ("vLLM does not yet support DoRA").
# 4. every module is scaled by lora_alpha / r of the config; lora_alpha / sqrt(r) when
#    use_rslora.
# 5. r <= --max-lora-rank, whose values are 1, 8, 16, 32, 64, 128, 256, 320, 512, default 16
#    ("LoRA rank {r} is greater than max_lora_rank {max}").
# 6. bias other than "none" needs bias support (removed in later versions): not exported.
# 7. weights are base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r).
VLLM_FIELDS = {"r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora",
               "use_dora", "context_length"}
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_deltas(folder: str, max_lora_rank: int) -> dict[str, np.ndarray]:
    """What vLLM computes from `folder`, after checking it against the rules above."""
    raw = json.load(open(os.path.join(folder, "adapter_config.json")))
    config = {k: v for k, v in raw.items() if k in VLLM_FIELDS}  # rule 1
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    assert not config.get("modules_to_save") and not config.get("use_dora")  # rules 2, 3
    assert config.get("bias", "none") == "none"  # rule 6
    assert max_lora_rank in MAX_LORA_RANKS and config["r"] <= max_lora_rank  # rule 5
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)  # rule 4
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        assert key.startswith("base_model.model.") and key.endswith(
            (".lora_A.weight", ".lora_B.weight"))  # rule 7
        if key.endswith(".lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            assert a.shape[0] == b.shape[1] <= max_lora_rank
            out[key[len("base_model.model."):-len(".lora_A.weight")]] = (b @ a).numpy() * scale
    return out


def serve_rank(folder: str) -> int:
    line = open(os.path.join(folder, "serve.sh")).read().split()
    assert line[:2] == ["vllm", "serve"] and "--enable-lora" in line
    assert line[line.index("--lora-modules") + 1] == f"adapter={folder}"
    return int(line[line.index("--max-lora-rank") + 1]) if "--max-lora-rank" in line else 16


@pytest.mark.parametrize("case", FOLDS)
def test_vllm_folder_computes_peftkits_deltas(tmp_path, case):
    pm, adapter, _ = make_adapter(tmp_path, LoraConfig(**LORA, **FOLDS[case]))
    out = str(tmp_path / "out")
    assert export("--adapter", adapter, "--format", "vllm", "--out", out,
                  "--base-model", "org/tiny") == 0
    deltas = vllm_deltas(out, serve_rank(out))
    layers = lora_layers(pm)
    assert set(deltas) == set(layers)
    for module, layer in layers.items():
        np.testing.assert_allclose(deltas[module], layer.delta_weight("default").detach().numpy(),
                                   rtol=1e-5, atol=1e-7, err_msg=module)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["base_model_name_or_path"] == "org/tiny"
    assert open(os.path.join(out, "serve.sh")).read().startswith("vllm serve org/tiny ")
    if case == "plain":  # nothing to fold: the adapter's own tensors
        assert open(os.path.join(out, "adapter_model.safetensors"), "rb").read() == open(
            os.path.join(adapter, "adapter_model.safetensors"), "rb").read()
    if case == "all":  # o_proj's rank 16 sets the rank; the rest are zero-padded
        assert config["r"] == 16 and serve_rank(out) == 16


def test_vllm_rank_above_default_gets_max_lora_rank(tmp_path, capsys):
    _, adapter, _ = make_adapter(tmp_path, LoraConfig(r=24, lora_alpha=48, target_modules=TARGETS))
    out = str(tmp_path / "out")
    assert export("--adapter", adapter, "--format", "vllm", "--out", out,
                  "--base-model", "org/tiny") == 0
    assert serve_rank(out) == 32
    assert "above vLLM's default --max-lora-rank 16" in capsys.readouterr().out


# ---------------------------------------------------------------- refusals


def refused(capsys, *args) -> str:
    assert export(*args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["gguf-lora", "gguf", "vllm"])
@pytest.mark.parametrize("config,way_out", [
    (PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "peftkit generate"),
    (AdapterConfig(), "peftkit generate"),
    (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
               feedforward_modules=["down_proj"]), "peftkit merge"),
])
def test_non_lora_methods_are_refused_with_the_way_out(tmp_path, capsys, fmt, config, way_out):
    _, adapter, base = make_adapter(tmp_path, config)
    err = refused(capsys, "--adapter", adapter, "--format", fmt, "--out", tmp_path / "out",
                  "--base-gguf", base)
    assert "cannot be exported" in err and way_out in err
    assert not (tmp_path / "out").exists()


def test_modules_to_save_and_bias_refusals_name_the_way_out(tmp_path, capsys):
    config = LoraConfig(**LORA, modules_to_save=["lm_head"], bias="all")
    _, adapter, base = make_adapter(tmp_path, config, attention_bias=True)
    err = refused(capsys, "--adapter", adapter, "--format", "gguf-lora", "--out",
                  tmp_path / "o", "--base-gguf", base)
    assert "lm_head.weight" in err and "--format gguf" in err
    err = refused(capsys, "--adapter", adapter, "--format", "vllm", "--out", tmp_path / "o",
                  "--base-model", "org/tiny")
    assert "modules_to_save=None only" in err and "bias='all'" in err
    assert "peftkit merge --adapter" in err


def test_dora_is_refused_for_every_target(tmp_path, capsys):
    _, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA))
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    json.dump({**config, "use_dora": True}, open(path, "w"))
    for fmt in ("gguf-lora", "gguf", "vllm"):
        err = refused(capsys, "--adapter", adapter, "--format", fmt, "--out", tmp_path / "o",
                      "--base-gguf", base)
        assert "DoRA" in err and "peftkit merge --adapter" in err


def test_lora_on_a_tied_head_is_refused_as_gguf_lora(tmp_path, capsys):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    _, adapter, base = make_adapter(tmp_path, config, tie_word_embeddings=True)
    err = refused(capsys, "--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "o",
                  "--base-gguf", base)
    assert "output.weight" in err and "--format gguf" in err


def test_wrong_or_missing_base_gguf_is_refused(tmp_path, capsys):
    _, adapter, _ = make_adapter(tmp_path, LoraConfig(**LORA))
    other = write_base_gguf(tiny_llama(hidden_size=32, intermediate_size=64,
                                       num_attention_heads=N_HEAD, num_key_value_heads=N_KV),
                            str(tmp_path / "other.gguf"))
    err = refused(capsys, "--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "o",
                  "--base-gguf", other)
    assert "does not fit blk.0.ffn_down.weight" in err and "--base-gguf" in err
    # the adapter names no base model, so the embedded model's GGUF is not assumed
    err = refused(capsys, "--adapter", adapter, "--format", "gguf", "--out", tmp_path / "o")
    assert "not the embedded SmolLM2-135M-Instruct" in err and "--base-gguf" in err
    err = refused(capsys, "--adapter", adapter, "--format", "vllm", "--out", tmp_path / "o")
    assert "--base-model" in err
    err = refused(capsys, "--adapter", adapter, "--format", "gguf", "--out", tmp_path / "o",
                  "--base-gguf", tmp_path / "missing.gguf")
    assert "does not exist" in err


def test_unsupported_architecture_is_refused(tmp_path, capsys):
    _, adapter, _ = make_adapter(tmp_path, LoraConfig(**LORA))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), arch="gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    err = refused(capsys, "--adapter", adapter, "--format", "gguf-lora", "--out", tmp_path / "o",
                  "--base-gguf", tmp_path / "gpt2.gguf")
    assert "'gpt2' model" in err and "convert_lora_to_gguf.py" in err


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    _, adapter, base = make_adapter(tmp_path, LoraConfig(**LORA))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["--adapter", adapter, "--format", "gguf-lora", "--out", out, "--base-gguf", base]
    proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "export", *map(str, args)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert export(*args, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["Modelfile", "adapter.gguf"]


# ---------------------------------------------------------------- doctor --adapter


def doctor(adapter: str, capsys) -> dict[str, str]:
    assert main(["doctor", "--adapter", adapter]) == 0
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())


def test_doctor_adapter_says_where_it_can_go(tmp_path, capsys):
    _, plain, _ = make_adapter(tmp_path, LoraConfig(**LORA), name="plain")
    verdicts = doctor(plain, capsys)
    assert verdicts["gguf-lora"].startswith("as it is") and verdicts["vllm"].startswith("as it")
    assert verdicts["gguf"].startswith("through `peftkit export --format gguf`")

    _, folded, _ = make_adapter(tmp_path, LoraConfig(**{**LORA, "r": 32}, **FOLDS["patterns"]),
                                name="folded")
    verdicts = doctor(folded, capsys)
    assert verdicts["gguf-lora"].startswith("only through") and "rank_pattern" in verdicts[
        "gguf-lora"]
    assert verdicts["vllm"].startswith("only through") and "--max-lora-rank" in verdicts["vllm"]

    _, rslora, _ = make_adapter(tmp_path, LoraConfig(**LORA, use_rslora=True), name="rs")
    verdicts = doctor(rslora, capsys)  # vLLM applies use_rslora itself; llama.cpp does not
    assert verdicts["vllm"].startswith("as it is") and "rsLoRA" in verdicts["gguf-lora"]

    _, prompt, _ = make_adapter(tmp_path, PromptTuningConfig(num_virtual_tokens=4), name="pt")
    assert all(v.startswith("no: ") for v in doctor(prompt, capsys).values())
