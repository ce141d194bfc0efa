"""`pip install peftkit` without extras (no datasets, matplotlib; pyyaml comes with
huggingface_hub): `peftkit train` works, or stops before the model loads naming the extra; an
optional step (the loss plot, a tracker) never costs a finished run (issue 14, item 5)."""

import json
import os
import subprocess
import sys

import pytest

from peftkit import cli
from peftkit.train import loading, options, run

# The packages a plain install lacks, and the trackers --report-to may name.
ABSENT = ("datasets", "matplotlib", "tensorboard", "tensorboardX", "wandb", "trackio")


def train_argv(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1",
            *extra]


def test_train_without_the_extras_saves_the_run_and_warns(model_dir, data, tmp_path):
    out = tmp_path / "run"
    script = ("import sys\n"
              f"for name in {ABSENT!r}:\n"
              "    sys.modules[name] = None  # import fails, as when not installed\n"
              "from peftkit.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    argv = train_argv(model_dir, data, out, "--report-to", "tensorboard")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(out / "adapter_model.safetensors")
    assert json.load(open(out / "run_summary.json"))["steps"] == 2
    assert not os.path.exists(out / "loss_curve.png")
    assert ("peftkit train: warning: no loss_curve.png (matplotlib is not installed; "
            "pip install 'peftkit[train]')") in done.stderr
    assert ("peftkit train: warning: --report-to tensorboard ignored: the 'tensorboard' "
            "package is not installed") in done.stderr


def test_the_loss_plot_runs_after_the_adapter_and_summary_are_written(
        model_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = []
    monkeypatch.setattr(run, "draw_loss_curve", lambda folder: seen.append(
        sorted(f for f in os.listdir(folder) if not f.startswith("checkpoint-"))))
    assert cli.main(train_argv(model_dir, data, out)) == 0, capsys.readouterr().err
    assert seen and {"adapter_model.safetensors", "adapter_config.json",
                     "run_summary.json"} <= set(seen[0])


@pytest.mark.parametrize("module, extra_argv, message", [
    ("yaml", ["--config", "CONFIG"], "--config (a YAML file) needs the 'yaml' package"),
    ("datasets", ["--data", "PARQUET"], "Reading .parquet data needs the 'datasets' package"),
])
def test_a_missing_extra_stops_before_the_model_loads(module, extra_argv, message, model_dir,
                                                      data, tmp_path, capsys, monkeypatch):
    config, parquet = tmp_path / "run.yaml", tmp_path / "rows.parquet"
    config.write_text("seed: 1\n")
    parquet.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    paths = {"CONFIG": str(config), "PARQUET": str(parquet)}
    argv = train_argv(model_dir, data, tmp_path / "o") + [paths.get(a, a) for a in extra_argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "pip install 'peftkit[train]'" in err, err


@pytest.mark.parametrize("report_to", options.REPORT_TO)
def test_report_to_reaches_the_training_arguments(report_to, tmp_path):
    args = options.resolve(cli.build_parser().parse_args(
        ["train", "--data", "d.jsonl", "--output-dir", str(tmp_path), "--report-to", report_to]))
    expected = [] if report_to == "none" else [report_to]
    assert run._training_arguments(args, has_eval=False).report_to == expected
