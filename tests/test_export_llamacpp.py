"""The real consumer: llama.cpp (through llama-cpp-python) runs peftkit's GGUF exports of a LoRA on
the embedded SmolLM2 and answers the demo task (`peftkit task ledger`) as peftkit does.

The adapter is deterministic (B drawn from a seeded normal, large enough to change the answers)
and uses rsLoRA, rank_pattern and alpha_pattern, so a fold that llama.cpp would get wrong shows.
Equality is checked on f32 files (llama.cpp's f32 matmuls match torch's to rounding); the wheel's
Q4_1 base with an f16 LoRA, and a q8_0 merged model, are measured and printed, not required equal.

Run: `make test-llamacpp` (needs llama-cpp-python; see docs/export.md for the build).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftkit import LoraConfig, get_peft_model, models, tasks
from peftkit.cli import main
from peftkit.export import gguf_model
from peftkit.export.base_gguf import BaseGGUF

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

NEW_TOKENS = 12
CONFIG = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "down_proj"],
              use_rslora=True, rank_pattern={r"layers\.(0|1)\.self_attn\.q_proj": 4},
              alpha_pattern={"v_proj": 8.0}, task_type="CAUSAL_LM")


def greedy_torch(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    answers, first_logits = [], []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            answers.append(out.sequences[0, len(ids):].tolist())
            first_logits.append(out.scores[0][0].float().numpy())
    return answers, first_logits


def greedy_llamacpp(path: str, prompts, lora: str | None = None, eos: int = 2):
    llm = llama_cpp.Llama(model_path=path, lora_path=lora, n_ctx=256, n_threads=2,
                          n_batch=256, logits_all=True, verbose=False)  # scores kept
    answers, first_logits = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        first_logits.append(np.array(llm.scores[llm.n_tokens - 1]))
        answer = []
        for _ in range(NEW_TOKENS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            answer.append(token)
            if token == eos:
                break
            llm.eval([token])
        answers.append(answer)
    return answers, first_logits


def trimmed(answer: list[int], eos: int) -> list[int]:
    return answer[:answer.index(eos) + 1] if eos in answer else answer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """peftkit's answers (base and adapted), and the exported files."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    model, tokenizer = models.load_default()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
               for q, _ in tasks.examples("ledger", 6, seed=7)]
    base_answers, _ = greedy_torch(model, prompts)
    pm = get_peft_model(model, LoraConfig(**CONFIG))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.eval()
    adapter = str(tmp / "adapter")
    pm.save_pretrained(adapter)
    answers, logits = greedy_torch(pm, prompts)
    base = BaseGGUF(models.default_gguf_path())
    f32_base = str(tmp / "base-f32.gguf")
    gguf_model.write(None, base, f32_base, "f32")
    for fmt, outtype, out in [("gguf-lora", "f32", "lora32"), ("gguf-lora", "f16", "lora16"),
                              ("gguf", "f32", "merged32"), ("gguf", "q8_0", "merged8")]:
        assert main(["export", "--adapter", adapter, "--format", fmt, "--outtype", outtype,
                     "--out", str(tmp / out)]) == 0
    return dict(tmp=tmp, prompts=prompts, base_answers=base_answers, answers=answers,
                logits=logits, f32_base=f32_base, q41_base=base.path,
                eos=tokenizer.eos_token_id)


def compare(run, answers, logits, label):
    eos = run["eos"]
    same = sum(trimmed(a, eos) == trimmed(b, eos) for a, b in zip(answers, run["answers"]))
    diff = max(np.abs(x - y).max() / np.abs(y).max() for x, y in zip(logits, run["logits"]))
    print(f"{label}: {same}/{len(answers)} greedy answers equal to peftkit's; first-token "
          f"logits differ by at most {diff:.1e} of the largest")
    return same, diff


def test_the_adapter_changes_the_answers(run):
    eos = run["eos"]
    assert any(trimmed(a, eos) != trimmed(b, eos)
               for a, b in zip(run["answers"], run["base_answers"]))


def test_llamacpp_f32_base_plus_lora_gguf_answers_as_peftkit(run):
    answers, logits = greedy_llamacpp(run["f32_base"], run["prompts"],
                                      lora=str(run["tmp"] / "lora32" / "adapter.gguf"))
    same, diff = compare(run, answers, logits, "f32 base + f32 LoRA GGUF")
    assert same == len(answers) and diff < 1e-3


def test_llamacpp_merged_f32_gguf_answers_as_peftkit(run):
    answers, logits = greedy_llamacpp(str(run["tmp"] / "merged32" / "model.gguf"),
                                      run["prompts"])
    same, diff = compare(run, answers, logits, "merged f32 GGUF")
    assert same == len(answers) and diff < 1e-3


def test_llamacpp_quantized_variants_load_and_are_measured(run):
    """The wheel's Q4_1 base + f16 LoRA, and the q8_0 merged model: how far from peftkit."""
    results = [
        compare(run, *greedy_llamacpp(run["q41_base"], run["prompts"],
                                      lora=str(run["tmp"] / "lora16" / "adapter.gguf")),
                "Q4_1 base + f16 LoRA GGUF"),
        compare(run, *greedy_llamacpp(str(run["tmp"] / "merged8" / "model.gguf"),
                                      run["prompts"]), "merged q8_0 GGUF"),
    ]
    # q8_0 rounds each weight by under 1/256 of its block's largest: logits stay within a few %
    assert results[1][1] < 0.05
