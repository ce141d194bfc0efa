"""`peftkit task`, `peftkit compare` and `peftkit sweep` at smoke size (a tiny random Llama, a few
steps; each run is a real child process) and their reporting on known records."""

from __future__ import annotations

import json
import os
import re

import pytest

from peftkit import tasks
from peftkit.cli import main
from peftkit.experiments import report
from peftkit.experiments.runs import Setup

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


def test_compare_measures_every_method_and_reports_a_failed_one(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", model_dir, "--out", str(out), *SMOKE,
            "--methods", "full,lora,adapter,prompt", "--set", "adapter.reduction_factor=1000"]
    assert main(argv) == 1  # one method failed
    results = json.loads((out / report.RESULTS).read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert list(runs) == ["zero-shot", "full", "lora", "adapter", "prompt"]
    assert runs["adapter"]["status"] == "failed" and "reduction" in runs["adapter"]["error"]
    full, lora = runs["full"], runs["lora"]
    assert full["trainable_pct"] == pytest.approx(100) and full["relative"]["train_seconds"] == 1
    assert lora["flags"]["r"] == 16 and lora["flags"]["learning_rate"] == 1e-3
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["relative"]["trainable_params"] == lora["trainable_params"] / full["all_params"]
    for run in (full, lora, runs["prompt"]):
        assert run["status"] == "ok" and run["steps"] == 2 and run["n_test"] == 6
        assert run["peak_memory_mb"] >= 0 and run["train_seconds"] > 0
        assert 0 <= run["exact_match"] <= 1 and run["eval_loss"] > 0
    table = (out / report.TABLE).read_text()
    assert "| full (reference) |" in table and "| adapter | failed:" in table
    assert all((out / name).stat().st_size > 0 for name in report.PLOTS)
    assert results["command"].startswith("peftkit compare --model")

    # --resume keeps finished rows (no new child runs) and retries the failed one.
    os.unlink(out / "runs" / "lora" / "log.txt")
    argv[-1] = "adapter.reduction_factor=4"
    assert main(argv + ["--resume"]) == 0
    assert not (out / "runs" / "lora" / "log.txt").exists()
    runs = {r["method"]: r for r in json.loads((out / report.RESULTS).read_text())["runs"]}
    assert runs["lora"] == {**lora, "relative": runs["lora"]["relative"]}
    assert runs["adapter"]["status"] == "ok"
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
    assert runs["r=4"]["relative"]["train_seconds"] == (runs["r=4"]["train_seconds"]
                                                        / runs["full"]["train_seconds"])


@pytest.mark.parametrize("extra, message", [
    (["--set", "lora.r"], "expected METHOD.OPTION=VALUE"),
    (["--lr", "lorra=1e-3"], "unknown method 'lorra'"),
    (["--set", "lora.rank=8"], "bad `peftkit train` options"),
    (["--set", "lora.variant=pfeiffer"], "--variant does not apply to --method lora"),
    (["--data", "x.jsonl"], "--data and --test-data go together"),
    (["--methods", "lora,dora"], "unknown method 'dora'"),
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


def test_table_gives_absolute_figures_and_shares_of_full_fine_tuning():
    def record(method, params, memory, seconds, em):
        return {"method": method, "train_method": method, "status": "ok", "trainable_params":
                params, "all_params": 1000, "trainable_pct": params / 10, "peak_memory_mb": memory,
                "peak_memory_kind": "process peak RSS above the loaded model",
                "train_seconds": seconds, "exact_match": em, "eval_loss": 0.5,
                "model_memory_mb": 900}

    full = record("full", 1000, 2000, 100, 0.8)
    rows = report.with_relative([full, record("lora", 5, 600, 25, 0.76)], full)
    table = report.markdown(rows, Setup("t.jsonl", "e.jsonl", "custom"), "full", "peftkit x")
    lora = "| lora | 5 (0.5%) | 600 MiB (30%) | 25 s (25%) | 0.76 (95%) | 0.500 | 900 MiB |"
    assert lora in table
    assert "| full (reference) | 1,000 (100%) | 2,000 MiB (100%) | 100 s (100%) |" in table
