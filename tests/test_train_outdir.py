"""`peftkit train`'s output folder: held by one run (a second `train` or a `merge` is refused
while a real training process holds it; its lock is taken over once that process is killed);
`--overwrite` moves the old run aside until the new run's first complete checkpoint, so a new run
that dies first resumes nothing of the old one; under torchrun only rank 0 holds the folder; the
run's files get the umask's mode."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from peftkit import cli, outdir
from peftkit.train import run as train_run
from peftkit.train.trainer import AdapterTrainer
from test_outdir import hold, kill9, tree
from test_train_cli import run, train_args


def wait_for_holder(out, pid, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.load(open(outdir.sibling(out, "lock")))["pid"] == pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"pid {pid} never held {out}")


def test_a_running_train_holds_its_folder_and_a_killed_one_is_taken_over(
        model_dir, data, tmp_path, capsys):
    out = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "peftkit.cli",
                              *map(str, train_args(model_dir, data, out, "--max-steps", 10**6))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_holder(out, first.pid)
        rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 1,
                                             "--overwrite"))
        assert rc == 2 and f"in use by `peftkit train` (pid {first.pid}" in err, err
        rc, _, err = run(capsys, "merge", "--adapter", out, "--output-dir", out, "--overwrite")
        assert rc == 2 and f"in use by `peftkit train` (pid {first.pid}" in err, err
    finally:
        kill9(first)
    rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 1, "--overwrite"))
    assert rc == 0 and f"taking over the lock of `peftkit train` (pid {first.pid}" in err, err
    assert not os.path.exists(outdir.sibling(out, "lock"))


def test_overwrite_keeps_the_old_run_aside_until_the_new_runs_first_checkpoint(
        model_dir, data, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    aside = outdir.sibling(out, "replaced")
    common = ["--max-steps", 4, "--save-steps", 2]
    assert run(capsys, *train_args(model_dir, data, out, *common))[0] == 0
    old = tree(out)
    assert {"checkpoint-2/trainer_state.json", "run_summary.json"} <= set(old)

    real_step = AdapterTrainer.training_step

    def die_at_first_step(self, *args, **kwargs):
        raise KeyboardInterrupt("killed before the first save")

    monkeypatch.setattr(AdapterTrainer, "training_step", die_at_first_step)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(a) for a in train_args(model_dir, data, out, *common, "--overwrite")])
    assert not any(name.startswith("checkpoint-") for name in os.listdir(out))
    assert tree(aside) == old  # recoverable, untouched
    rc, _, err = run(capsys, *train_args(model_dir, data, out, *common, "--resume"))
    assert rc == 2 and "no complete checkpoint" in err, err  # nothing of the old run resumed

    seen = []  # does the old run's copy exist at each training step of the next run?
    monkeypatch.setattr(AdapterTrainer, "training_step", lambda self, *a, **kw: (
        seen.append(os.path.exists(aside)) or real_step(self, *a, **kw)))
    rc, _, err = run(capsys, *train_args(model_dir, data, out, *common, "--overwrite", "--r", 4))
    assert rc == 0, err
    assert seen == [True, True, False, False]  # deleted once checkpoint-2 was complete
    assert not os.path.exists(aside)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["r"] == 4
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_only_rank_zero_holds_the_output_dir(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = train_run.argparse.Namespace(output_dir=str(out))
    child = hold(out)
    try:
        monkeypatch.setenv("RANK", "1")
        with train_run.hold_output_dir(args):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(outdir.OutputDirBusy):
            with train_run.hold_output_dir(args):
                pass
    finally:
        kill9(child)


def test_run_files_follow_the_umask(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        rc, _, err = run(capsys, *train_args(model_dir, data, out, "--max-steps", 1))
    finally:
        os.umask(previous)
    assert rc == 0, err
    for name in ("adapter_model.safetensors", "adapter_config.json", "run_summary.json",
                 "checkpoint-1/adapter_model.safetensors", "tokenizer.json"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o640, name
