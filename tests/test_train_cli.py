"""`peftkit train|eval|generate|merge` end to end on a tiny model, YAML configs, resume, and every
bad-input case of the train command."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from peftkit import cli
from peftkit.methods import registry


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output-dir", out,
            "--batch-size", 4, "--grad-accum", 1, "--logging-steps", 1, "--learning-rate", 1e-2,
            *extra]


def greedy_exact_match(where: list[str], data: str, max_new_tokens: int) -> float:
    """Exact match recomputed row by row: one unpadded greedy generation per prompt."""
    from peftkit.train.loading import load_for_inference

    adapter, model = (where[1], None) if where[0] == "--adapter" else (None, where[1])
    model, tokenizer = load_for_inference(adapter, model)
    rows = [json.loads(line) for line in open(data)]
    hits = 0
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += answer.strip() == row["completion"]
    return hits / len(rows)


@pytest.mark.parametrize("method", sorted(registry.SPECS))
def test_train_save_eval_generate_merge(method, model_dir, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, stdout, err = run(capsys, *train_args(model_dir, data, out, "--method", method,
                                              "--max-steps", 3, "--eval-split", 0.25))
    assert rc == 0, err
    assert "trainable params:" in stdout
    summary = json.load(open(os.path.join(out, "run_summary.json")))
    assert summary["steps"] == 3 and summary["method"] == method
    assert 0 < summary["trainable_params"] <= summary["all_params"]
    assert {"train_loss", "eval_loss"} <= set(summary["final_metrics"])
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert os.path.getsize(os.path.join(out, "loss_curve.png")) > 0

    is_adapter = method != "full"
    where = ["--adapter", out] if is_adapter else ["--model", out]
    rc, stdout, err = run(capsys, "eval", *where, "--data", data, "--json", "--max-new-tokens", 4)
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["n"] == 16 and result["loss"] > 0
    assert result["exact_match"] == greedy_exact_match(where, data, max_new_tokens=4)
    rc, _, err = run(capsys, "generate", *where, "--prompt", "1+2=", "--raw",
                     "--max-new-tokens", 3)
    assert rc == 0, err
    if not is_adapter:
        return
    merged = str(tmp_path / "merged")
    rc, _, err = run(capsys, "merge", "--adapter", out, "--output-dir", merged)
    if not registry.spec(method).merges:
        assert rc == 2 and re.search("cannot be (folded|merged)", err), err
        return
    assert rc == 0, err
    rc, stdout, err = run(capsys, "eval", "--model", merged, "--data", data, "--json",
                          "--max-new-tokens", 4)
    assert rc == 0, err
    merged_result = json.loads(stdout)
    assert merged_result["exact_match"] == result["exact_match"]
    assert merged_result["loss"] == pytest.approx(result["loss"], abs=1e-5)
    if method == "qlora":  # merged into the dequantized 4-bit base the adapter trained on
        rc, stdout, err = run(capsys, "merge", "--adapter", out, "--dequantize",
                              "--output-dir", str(tmp_path / "dequantized"))
        assert rc == 0 and "merge check" in stdout, err
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dequantized"))
        assert all(type(m).__module__.startswith("torch") for m in plain.modules()
                   if "Linear" in type(m).__name__)


def test_lora_adapter_is_peft_layout_and_loads_in_peft(model_dir, data, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 2, "--r", 4,
                                         "--target-modules", "q_proj,k_proj"))
    assert rc == 0, err
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (config["peft_type"], config["r"], sorted(config["target_modules"])) == (
        "LORA", 4, ["k_proj", "q_proj"])
    state = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in state)
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    from peftkit.train.loading import load_for_inference

    ours, _ = load_for_inference(out)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits)


def test_yaml_config_with_command_line_overrides(model_dir, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data}\noutput_dir: {out}\nr: 4\n"
                      "lora_alpha: 8\nmax_steps: 2\nlearning_rate: 2e-4\nbatch_size: 4\n"
                      "target_modules: q_proj,v_proj\n")
    rc, _, err = run(capsys, "train", "--config", config, "--r", 2)
    assert rc == 0, err
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (saved["r"], saved["lora_alpha"]) == (2, 8)
    state = json.load(open(os.path.join(out, "checkpoint-2", "trainer_state.json")))
    assert state["max_steps"] == 2
    config.write_text("learning_rat: 0.1\n")
    rc, _, err = run(capsys, "train", "--config", config)
    assert rc == 2 and "unknown option(s) ['learning_rat']" in err


def test_resume_after_interrupted_save_matches_uninterrupted_run(
        model_dir, data, tmp_path, capsys, monkeypatch):
    from peftkit.train.trainer import AdapterTrainer

    common = ["--max-steps", 6, "--save-steps", 2, "--lora-dropout", 0.1, "--seed", 3]
    straight = str(tmp_path / "straight")
    assert run(capsys, *train_args(model_dir, data, straight, *common))[0] == 0

    crashed = str(tmp_path / "crashed")
    original = AdapterTrainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("power cut while saving")
        original(self, output_dir)

    monkeypatch.setattr(AdapterTrainer, "_save_rng_state", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(a) for a in train_args(model_dir, data, crashed, *common)])
    monkeypatch.setattr(AdapterTrainer, "_save_rng_state", original)
    assert os.path.isfile(os.path.join(crashed, "checkpoint-4", "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(crashed, "checkpoint-4", "trainer_state.json"))

    rc, _, err = run(capsys, *train_args(model_dir, data, crashed, *common))
    assert rc == 2 and "--resume" in err  # the half-written run is not overwritten silently
    rc, _, err = run(capsys, *train_args(model_dir, data, crashed, *common, "--resume"))
    assert rc == 0, err
    summary = json.load(open(os.path.join(crashed, "run_summary.json")))
    assert summary["resumed_from"].endswith("checkpoint-2")
    a = load_file(os.path.join(straight, "adapter_model.safetensors"))
    b = load_file(os.path.join(crashed, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_resumed_run_reports_the_train_loss_of_the_whole_run(model_dir, data, tmp_path, capsys):
    """Checkpoints every 3 steps, loss logged every 4: a run resumed from checkpoint-3 reports
    the mean loss of all 6 steps, as the uninterrupted run does (transformers' own
    `training_loss` covers only the resumed steps 4-6)."""
    common = ["--max-steps", 6, "--save-steps", 3, "--logging-steps", 4, "--seed", 5]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(capsys, *train_args(model_dir, data, straight, *common))[0] == 0
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    rc, _, err = run(capsys, *train_args(model_dir, data, resumed, *common, "--resume"))
    assert rc == 0, err
    first, second = (json.load(open(folder / "run_summary.json"))["final_metrics"]["train_loss"]
                     for folder in (straight, resumed))
    assert second == pytest.approx(first, rel=1e-6, abs=0)
    state = json.load(open(straight / "checkpoint-3" / "trainer_state.json"))
    steps_1_to_3 = [r["loss"] for r in state["log_history"] if "loss" in r]
    assert len(steps_1_to_3) == 1 and steps_1_to_3[0] != pytest.approx(first, rel=1e-3)


@pytest.mark.parametrize("method, fused", [("lora", True), ("full", True), ("prompt", False)])
def test_fused_loss_equals_stock_loss(method, fused, model_dir, tmp_path, capsys, monkeypatch):
    """`peftkit train` with the fused loss (the default) gives every micro-batch the loss and
    trains the weights `--no-fused-loss` does, within fp32 rounding: rows of different lengths
    (padded batches, a different token count per micro-batch), gradient accumulation 2 (the last
    step accumulates one micro-batch), LoRA dropout on (both runs draw the same masks). The fused
    loss runs for every training micro-batch and never for evaluation; prompt tuning keeps the
    stock loss (its virtual tokens take part in it)."""
    import peftkit.fast.loss as loss_module
    import peftkit.train.trainer as trainer_module

    rows = [{"prompt": f"{a} plus {b}" + "?" * a, "completion": str(a + b) * (1 + b % 3)}
            for a in range(4) for b in range(3)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls, losses = [], []  # fused-loss calls; every micro-batch's loss, unrounded
    real_loss, real_step = loss_module.causal_lm_loss, trainer_module.AdapterTrainer.training_step
    monkeypatch.setattr(loss_module, "causal_lm_loss",
                        lambda *a, **kw: calls.append(1) or real_loss(*a, **kw))
    monkeypatch.setattr(trainer_module.AdapterTrainer, "training_step",
                        lambda *a, **kw: losses.append(real_step(*a, **kw)) or losses[-1])
    results = {}
    for flag in ("--fused-loss", "--no-fused-loss"):
        out = str(tmp_path / flag)
        calls.clear()
        losses.clear()
        rc, _, err = run(capsys, *train_args(model_dir, str(data), out, flag, "--method", method,
                                             "--batch-size", 2, "--grad-accum", 2,
                                             "--max-steps", 3, "--eval-split", 0.25))
        assert rc == 0, err
        logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
        weights = {k: v for f in files for k, v in load_file(os.path.join(out, f)).items()}
        results[flag] = (torch.stack(losses), [r["eval_loss"] for r in logged if "eval_loss" in r],
                         weights, len(calls))
    (steps, evals, weights, n), (ref_steps, ref_evals, ref_weights, ref_n) = results.values()
    assert (n, ref_n) == ((5, 0) if fused else (0, 0))  # 9 training rows: 5 micro-batches
    assert len(steps) == 5 and evals and weights.keys() == ref_weights.keys()
    torch.testing.assert_close(steps, ref_steps, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(evals), torch.tensor(ref_evals), rtol=1e-5, atol=0)
    # Both losses round differently in fp32 (the softmax: exp(z - max) / sum vs exp(log_softmax));
    # test_fused_lora checks both err alike against float64. Adam normalizes each gradient
    # element, so after 3 steps at lr 1e-2 a near-zero element can carry that rounding into a
    # few 1e-7 of its weight.
    for key, value in ref_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["--gradient-checkpointing"]])
def test_training_steps_use_the_speed_layer(extra, model_dir, data, tmp_path, capsys,
                                            monkeypatch):
    """Training forwards run the MLPs through SiluMul and the LoRA branches through LoraFunction,
    also under gradient checkpointing (the recomputation runs the same forward); evaluation runs
    them without grad."""
    from peftkit.fast import lora_fn, swiglu

    calls = {swiglu.SiluMul: [], lora_fn.LoraFunction: []}
    for fn, log in calls.items():
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply, log=log:
                            log.append(torch.is_grad_enabled()) or real(*a))
    rc, _, err = run(capsys, *train_args(model_dir, data, str(tmp_path / "o"), "--max-steps", 2,
                                         "--eval-split", 0.25, *extra))
    assert rc == 0, err
    silu, lora = calls.values()
    # 2 steps x 2 layers; each checkpointed layer runs its forward again in backward
    assert silu.count(True) == 2 * 2 * (2 if extra else 1)
    assert silu.count(False) > 0  # evaluation
    # the tiny model's defaults target q and v: 2 per layer
    assert lora.count(True) == 2 * 2 * 2 * (2 if extra else 1)


@pytest.mark.parametrize("flag, env, said", [
    (None, None, "dtype float32 (the CPU has neither"),
    (None, "bfloat16", "dtype bfloat16 ($PEFTKIT_DTYPE)"),
    ("bfloat16", "float32", "dtype bfloat16 (--dtype)")])
def test_dtype_is_chosen_and_logged(flag, env, said, model_dir, data, tmp_path, capsys,
                                    monkeypatch):
    """--dtype auto (the default) picks fp32 on a CPU without bf16 hardware and says why, or what
    $PEFTKIT_DTYPE says; --dtype bfloat16 loads the base in bf16 (the adapters stay fp32)."""
    from peftkit.fast import dtype as fast_dtype

    if env:
        monkeypatch.setenv("PEFTKIT_DTYPE", env)
    else:
        monkeypatch.delenv("PEFTKIT_DTYPE")
    monkeypatch.setattr(fast_dtype, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = ["--dtype", flag] if flag else []
    rc, out, err = run(capsys, *train_args(model_dir, data, str(tmp_path / "o"), "--max-steps", 1,
                                           *extra))
    assert rc == 0, err
    assert f"peftkit train: {said}" in out


@pytest.mark.parametrize("extra, message", [
    (["--method", "dora"], "unknown method 'dora'; choose one of full, lora"),
    (["--method", "full", "--r", 4], "--r does not apply to --method full (it applies to: lora"),
    (["--resume"], "no complete checkpoint-N folder"),
])
def test_bad_method_flag_or_resume(model_dir, data, tmp_path, capsys, extra, message):
    rc, _, err = run(capsys, *train_args(model_dir, data, str(tmp_path / "o"), *extra))
    assert rc == 2 and message in err, err


def test_existing_output_dir_refused_unless_overwrite(model_dir, data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 1))
    assert rc == 2 and "exists and is not empty" in err and "--overwrite" in err
    rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 1, "--overwrite"))
    assert rc == 0, err


def test_data_errors_reach_the_user(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = run(capsys, *train_args(model_dir, str(empty), tmp_path / "o"))
    assert rc == 2 and f"{empty}: the dataset is empty" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "answer": "b"}\n')
    rc, _, err = run(capsys, *train_args(model_dir, str(bad), tmp_path / "o2"))
    assert rc == 2 and f"{bad}:2: missing field 'completion'" in err


def test_chat_answers_each_line_until_an_empty_one(model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\nho\n\nnot read\n"))
    rc, out, err = run(capsys, "chat", "--model", model_dir, "--max-new-tokens", 3)
    assert rc == 0, err
    assert len(out.splitlines()) == 2  # one reply per user line; /reset and the end print none


def test_dora_and_loraplus_flags(model_dir, data, tmp_path, capsys, monkeypatch):
    """--use-dora saves DoRA's magnitudes; --loraplus-lr-ratio gives the Trainer LoRA+'s groups
    (B at 16x the learning rate) with --optim's AdamW."""
    from peftkit.train import trainer

    built = []
    real = trainer.create_loraplus_optimizer
    monkeypatch.setattr(trainer, "create_loraplus_optimizer",
                        lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    out = str(tmp_path / "o")
    rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 1, "--use-dora",
                                         "--loraplus-lr-ratio", 16))
    assert rc == 0, err
    assert any(k.endswith(".lora_magnitude_vector")
               for k in load_file(os.path.join(out, "adapter_model.safetensors")))
    [optimizer] = built
    assert isinstance(optimizer, torch.optim.AdamW)
    # the scheduler has moved "lr"; it keeps each group's own rate as "initial_lr"
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1e-2, 1e-6, 1e-2 * 16, 1e-2 * 16]


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or torch.cuda.is_available(),
                    reason="the CPU figure reads Linux's /proc")
def test_peak_memory_starts_from_live_memory():
    """Buffers freed before `start()`, as loading a 4-bit base frees its fp32 weights, are not
    counted in the level at start (else training reuses them unseen, and the two figures split one
    amount differently from run to run): glibc's free heap pages go back to the OS first."""
    from peftkit.train.run import PeakMemory, _status_mb

    # 200 MB of heap chunks (below mmap's threshold), each followed by a small live one (above
    # pymalloc's 512 bytes), so that freeing them leaves holes glibc does not trim by itself
    chunks = [(bytearray(100_000), bytearray(1_000)) for _ in range(2000)]
    pins = [pin for _, pin in chunks]
    del chunks
    freed = _status_mb("VmRSS")
    memory = PeakMemory()
    memory.start()
    assert freed - memory.at_start > 150
    del pins
