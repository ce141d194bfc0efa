"""`peftkit task`, `peftkit compare` and `peftkit sweep` at smoke size (a tiny random Llama, a few
steps; each run is a real child process) and their reporting on known records."""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest

from peftkit import tasks
from peftkit.cli import main
from peftkit.experiments import options, report, stats, variants
from peftkit.experiments.runs import Run, Setup, _figures, check
from peftkit.methods import registry

SMOKE = ["--task", "arithmetic", "--n-train", "24", "--n-test", "6", "--max-steps", "2",
         "--batch-size", "4", "--max-length", "128"]


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_tasks_are_deterministic_and_test_rows_are_unseen(name, tmp_path):
    train, test = tasks.write(name, str(tmp_path / "a"), n_train=200, n_test=50)
    again, _ = tasks.write(name, str(tmp_path / "b"), n_train=200, n_test=50)
    assert open(train).read() == open(again).read()
    rows = {split: [json.loads(line)["messages"] for line in open(path)]
            for split, path in (("train", train), ("test", test))}
    questions = {split: {m[0]["content"] for m in r} for split, r in rows.items()}
    assert len(questions["train"]) == 200 and len(questions["test"]) == 50
    assert not questions["train"] & questions["test"]
    assert all(m[0]["role"] == "user" and m[1]["role"] == "assistant" for r in rows.values()
               for m in r)


def test_task_answers_follow_from_their_questions():
    for question, answer in tasks.examples("extract-json", 50, 3):
        record = json.loads(answer)
        assert list(record) == ["name", "age", "city", "job"]
        assert all(str(v) in question for v in record.values())
    for question, answer in tasks.examples("snake-case", 50, 3):
        words = re.split(r"[ -]", question.split(": ", 1)[1])
        assert answer == "_".join(w.lower() for w in words)
    carries = 0
    for question, answer in tasks.examples("shifts", 200, 3):
        (h1, m1), (h2, m2) = [map(int, t) for t in re.findall(r"(\d+):(\d\d)", question)]
        hours, minutes = map(int, answer.split(":"))
        assert (hours, minutes) == divmod(60 * (h1 + h2) + m1 + m2, 60) and len(answer) <= 5
        carries += m1 + m2 >= 60
    assert 70 < carries < 130  # about half the rows carry
    for question, answer in tasks.examples("arithmetic", 50, 3):
        start, gain, loss = map(int, re.findall(r"\d+", question))
        assert int(answer) == start + gain - loss >= 0


def test_task_command_lists_and_writes(tmp_path, capsys):
    assert main(["task", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in tasks.TASKS)
    assert main(["task", "snake-case", "--out", str(tmp_path), "--n-train", "5"]) == 0
    assert sum(1 for _ in open(tmp_path / "train.jsonl")) == 5
    assert main(["task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_compare_runs_each_method_per_seed_and_reports_a_failed_one(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", model_dir, "--out", str(out), *SMOKE, "--seeds", "1,2",
            "--methods", "full,dora,adapter", "--set", "adapter.reduction_factor=1000"]
    assert main(argv) == 1  # one method failed
    results = json.loads((out / report.RESULTS).read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("zero-shot", None), ("full", 1), ("dora", 1), ("adapter", 1), ("full", 2), ("dora", 2),
        ("adapter", 2)]
    methods = {m["method"]: m for m in results["methods"]}
    assert list(methods) == ["zero-shot", "full", "dora", "adapter"]
    adapter, full, dora = methods["adapter"], methods["full"], methods["dora"]
    assert adapter["seeds"] == [] and "reduction" in adapter["errors"][0]
    assert dora["flags"] == {"learning_rate": 1e-3, "r": 16, "lora_alpha": 32,
                             "lora_dropout": 0.05, "target_modules": "q_proj,k_proj,v_proj,o_proj",
                             "use_dora": True}
    # r=16 on q (16->16), k, v (16->8), o (16->16) of 2 layers, plus DoRA's magnitudes (out)
    assert dora["trainable_params"] == 2 * (16 * (32 + 24 + 24 + 32) + 48) == 3680
    assert full["trainable_params"] == full["all_params"]
    assert dora["relative"]["trainable_params"] == pytest.approx(3680 / full["all_params"])
    for m in (full, dora):
        assert m["seeds"] == [1, 2] and m["n_test"] == 6
        assert m["exact_match"]["n"] == 2 and m["forgetting_kl"]["mean"] > 0
        assert m["peak_memory_kind"] == "process peak RSS above the loaded model"
    assert methods["zero-shot"]["forgetting_kl"]["mean"] == 0
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    # seeds change initialization and data order: the two runs of a method differ
    assert runs["dora", 1]["eval_loss"] != runs["dora", 2]["eval_loss"]
    table = (out / report.TABLE).read_text()
    assert "| full (reference) |" in table and "| adapter | failed:" in table
    dora_row = next(line for line in table.splitlines() if line.startswith("| dora |"))
    cells = [c.strip() for c in dora_row.split("|")[1:-1]]
    assert cells[1].startswith("3,680 (") and cells[7] == "2"
    assert all(" ± " in cells[i] for i in (2, 3, 4, 5, 6))  # memory, time, em, loss, KL
    assert all((out / name).stat().st_size > 0 for name in report.PLOTS)
    assert results["command"].startswith("peftkit compare --model")

    # --resume keeps finished (method, seed) runs (no new child runs) and retries the failed ones.
    os.unlink(out / "runs" / "dora" / "seed-1" / "log.txt")
    argv[argv.index("adapter.reduction_factor=1000")] = "adapter.reduction_factor=4"
    assert main(argv + ["--resume"]) == 0
    assert not (out / "runs" / "dora" / "seed-1" / "log.txt").exists()
    again = json.loads((out / report.RESULTS).read_text())
    assert {(r["method"], r["seed"]): r for r in again["runs"]}["dora", 1] == runs["dora", 1]
    assert [m["seeds"] for m in again["methods"] if m["method"] == "adapter"] == [[1, 2]]
    assert "kept from the earlier results" in capsys.readouterr().out


def test_sweep_runs_each_value_against_a_reference_from_compare(model_dir, tmp_path):
    cmp_out, out = tmp_path / "cmp", tmp_path / "sweep"
    assert main(["compare", "--model", model_dir, "--out", str(cmp_out), *SMOKE,
                 "--methods", "full"]) == 0
    assert main(["sweep", "--model", model_dir, "--out", str(out), *SMOKE, "--param", "r",
                 "--values", "2,4", "--reference", str(cmp_out / report.RESULTS)]) == 0
    runs = {r["method"]: r for r in json.loads((out / report.RESULTS).read_text())["runs"]}
    assert list(runs) == ["zero-shot", "full", "r=2", "r=4"]
    assert (runs["r=2"]["flags"]["r"], runs["r=2"]["flags"]["lora_alpha"]) == (2, 4.0)
    assert runs["r=4"]["trainable_params"] == 2 * runs["r=2"]["trainable_params"]


@pytest.mark.parametrize("extra, message", [
    (["--set", "lora.r"], "expected METHOD.OPTION=VALUE"),
    (["--lr", "lorra=1e-3"], "unknown method 'lorra'"),
    (["--set", "lora.rank=8"], "bad `peftkit train` options"),
    (["--set", "lora.variant=pfeiffer"], "--variant does not apply to --method lora"),
    (["--data", "x.jsonl"], "--data and --test-data go together"),
    (["--methods", "lora,dorra"], "unknown method 'dorra'"),
    (["--set", "dorra.r=4"], "unknown method 'dorra'"),
])
def test_bad_compare_options_fail_before_any_run(extra, message, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "o"), *SMOKE, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()


def test_sweep_refuses_budget_params_and_a_mismatched_reference(tmp_path, capsys):
    assert main(["sweep", "--out", str(tmp_path), *SMOKE, "--param", "max_steps",
                 "--values", "1,2"]) == 2
    assert "part of the budget" in capsys.readouterr().err
    other = Setup("a", "b", "ledger")
    (tmp_path / "ref.json").write_text(json.dumps({"setup": other.as_dict(), "runs": []}))
    assert main(["sweep", "--out", str(tmp_path), *SMOKE, "--param", "r", "--values", "1,2",
                 "--reference", str(tmp_path / "ref.json")]) == 2
    assert "another setup" in capsys.readouterr().err


def test_table_gives_means_with_t_intervals_and_shares_of_full_fine_tuning():
    def run(method, seed, params, memory, seconds, em, kl):
        return {"method": method, "train_method": method, "seed": seed, "status": "ok",
                "trainable_params": params, "all_params": 1000, "trainable_pct": params / 10,
                "peak_memory_mb": memory, "peak_memory_kind": "process peak RSS above the "
                "loaded model", "train_seconds": seconds, "exact_match": em, "eval_loss": 0.5,
                "forgetting_kl": kl, "model_memory_mb": 900}

    records = [run("full", 1, 1000, 2000, 100, 0.8, 0.2), run("full", 2, 1000, 2000, 100, 0.8, 0.4),
               run("lora", 1, 5, 600, 20, 0.7, 0.01), run("lora", 2, 5, 600, 30, 0.9, 0.03),
               {"method": "lora", "train_method": "lora", "seed": 3, "status": "failed",
                "error": "boom"}]
    summaries = report.summarize(records)
    rows = report.with_relative(summaries, summaries[0])
    table = report.markdown(rows, Setup("t.jsonl", "e.jsonl", "custom"), "full", "peftkit x")
    # two seeds: half-width = t(0.975, 1) * s / sqrt(2) = 12.7062 * s / sqrt(2); em s = 0.1414
    lora = ("| lora | 5 (0.5%) | 600 ± 0 MiB (30%) | 25 ± 64 s (25%) | 0.80 ± 1.27 (100%) | "
            "0.500 ± 0.000 | 0.02 ± 0.127 | 2 (1 failed) | 900 ± 0 MiB |")
    assert lora in table
    assert "| full (reference) | 1,000 (100%) | 2,000 ± 0 MiB (100%) | 100 ± 0 s (100%) |" in table
    assert rows[1]["errors"] == ["boom"] and rows[1]["seeds"] == [1, 2]


def test_t_quantiles_and_intervals_match_published_values():
    # Student t 0.975 quantiles from a statistics table (df 1, 4, 10, 30, 40, 120)
    for df, t in ((1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042), (40, 2.021), (120, 1.980)):
        assert stats.t975(df) == pytest.approx(t, abs=1e-3)
    i = stats.interval([1.0, 2.0, 3.0])  # mean 2, s 1: 4.3027 / sqrt(3)
    assert (i["mean"], i["n"]) == (2.0, 3) and i["half_width"] == pytest.approx(2.4842, abs=1e-4)
    assert (i["low"], i["high"]) == pytest.approx((2 - 2.4842, 2 + 2.4842), abs=1e-4)
    assert stats.interval([0.5])["half_width"] is None


def test_seeds_option_takes_a_count_or_a_list():
    assert options.seed_list("3") == [1, 2, 3]
    assert options.seed_list("7,9") == [7, 9] and options.seed_list("42,") == [42]
    for bad in ("0", "1,1", "-1,2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.seed_list(bad)
    assert len(options.seed_list("10")) == 10
    with pytest.raises(argparse.ArgumentTypeError, match="--seeds 42,"):  # seed 42, not 42 runs
        options.seed_list("42")


def test_presets_are_their_base_method_with_extra_flags(tmp_path):
    lora = variants.flags(variants.get("lora", ""), {})
    extra = {"lora": {"r": 8}, "dora": {"learning_rate": 5e-4}}
    dora = variants.flags(variants.get("dora", ""), extra)
    assert dora == {**lora, "r": 8, "use_dora": True, "learning_rate": 5e-4}
    assert variants.flags(variants.get("rslora", ""), extra)["learning_rate"] == 1e-3
    assert variants.flags(variants.get("lora-all", ""), {})["target_modules"] == "all-linear"
    narrowed = {"lora": {"target_modules": "q_proj"}}  # a base override keeps what makes a preset
    assert variants.flags(variants.get("lora-all", ""), narrowed)["target_modules"] == "all-linear"
    assert variants.flags(variants.get("lora", ""), narrowed)["target_modules"] == "q_proj"
    assert variants.flags(variants.get("lora-all", ""), {"lora-all": {"target_modules": "v_proj"}}
                          )["target_modules"] == "v_proj"
    assert variants.flags(variants.get("loraplus", ""), {})["loraplus_lr_ratio"] == 16
    has_init = "init_lora_weights" in registry.spec("lora").flags
    names = variants.default_names()
    assert ("pissa" in names) == ("olora" in names) == has_init
    assert names[:6] == ["full", "lora", "lora-all", "rslora", "dora", "loraplus"]
    setup = Setup("t.jsonl", "e.jsonl", "custom")
    for name in names:  # each parses as a `peftkit train` command line
        v = variants.get(name, "")
        check(Run(name, v.method, variants.flags(v, {}), seed=1), setup)


def test_figures_count_peak_memory_above_the_loaded_model(tmp_path):
    summary = {"trainable_params": 5, "all_params": 10, "trainable_percent": 50.0,
               "peak_memory_mb": 900.0, "memory_at_start_mb": 700.0,
               "peak_memory_kind": "process_peak_rss", "wall_time_s": 3.0, "steps": 2,
               "final_metrics": {"train_loss": 1.0, "test_exact_match": 0.5, "test_loss": 2.0,
                                 "test_rows": 4, "forgetting_kl": 0.1}}
    (tmp_path / "run_summary.json").write_text(json.dumps(summary))
    figures = _figures(str(tmp_path))
    assert (figures["peak_memory_mb"], figures["model_memory_mb"]) == (200.0, 700.0)
    assert figures["forgetting_kl"] == 0.1
