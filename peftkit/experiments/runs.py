"""Running one experiment: a list of runs on one task and one budget, each in its own processes.

A run is a `peftkit train` method with its flags and a seed. It runs in a child process, `peftkit
train --test-data --forgetting`, which trains, then evaluates the trained model on the test split
(exact match of greedy answers, loss per answer token), measures its drift from the untouched
model (`train.forgetting`) and writes it all to `run_summary.json` with the trainable parameters,
wall time and memory. The zero-shot row is a `peftkit eval --json` child.
Fresh processes keep one method's memory out of the next one's measurement, and a crash fails
one row, not the experiment.

Peak training memory on CPU is the process's peak RSS during `trainer.train()` minus its RSS just
before (the loaded model and runtime); on CUDA it is `max_memory_allocated` during training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

ZERO_SHOT = "zero-shot"
EVAL_BATCH = 32  # rows per generation batch on the test split (does not touch training)


@dataclass(frozen=True)
class Setup:
    """What every run of an experiment shares: the data, the model and the budget (each run has
    its own seed)."""
    train_data: str
    test_data: str
    task: str  # a registry name, or "custom" for user files
    data_sha256: str = ""  # of the two files' contents: same data under other paths matches
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    max_steps: int = 40
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    max_new_tokens: int = 64

    def as_dict(self) -> dict:
        return asdict(self)

    def matches(self, stored: dict) -> bool:
        """True when `stored` (an `as_dict()`) is this setup, the data files' paths aside."""
        paths = ("train_data", "test_data")
        return ({k: v for k, v in stored.items() if k not in paths}
                == {k: v for k, v in self.as_dict().items() if k not in paths})


@dataclass(frozen=True)
class Run:
    label: str
    method: str  # a `peftkit train --method`, or ZERO_SHOT
    flags: dict[str, Any] = field(default_factory=dict)  # `peftkit train` options, snake_case
    seed: int | None = None  # None: zero-shot (greedy decoding draws nothing)

    @property
    def key(self) -> tuple[str, int | None]:
        return self.label, self.seed

    @property
    def title(self) -> str:
        return self.label if self.seed is None else f"{self.label} seed {self.seed}"

    @property
    def folder(self) -> str:
        return self.label if self.seed is None else os.path.join(self.label, f"seed-{self.seed}")


def _argv(flags: dict[str, Any]) -> list[str]:
    out = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def train_argv(run: Run, setup: Setup, out_dir: str) -> list[str]:
    budget = {k: getattr(setup, k) for k in ("max_steps", "batch_size", "grad_accum",
                                             "max_length")}
    # --save-steps past the end: no checkpoint is written inside the timed training.
    return ["train", "--method", run.method, "--data", setup.train_data, "--output-dir", out_dir,
            "--overwrite", "--save-steps", str(setup.max_steps + 1), "--test-data",
            setup.test_data, "--max-new-tokens", str(setup.max_new_tokens), "--eval-batch-size",
            str(EVAL_BATCH), "--forgetting",
            *_argv({"model": setup.model, **budget, "seed": run.seed, **run.flags})]


def zero_shot_argv(setup: Setup) -> list[str]:
    return ["eval", "--json", "--data", setup.test_data, "--max-new-tokens",
            str(setup.max_new_tokens), "--max-length", str(setup.max_length),
            "--batch-size", str(EVAL_BATCH), *_argv({"model": setup.model})]


def check(run: Run, setup: Setup) -> None:
    """Parse the run's `peftkit train` command in-process, so a bad flag fails before any
    training starts."""
    if run.method == ZERO_SHOT:
        return
    from ..cli import build_parser
    from ..methods import registry
    from ..train import options

    try:
        args = build_parser().parse_args(train_argv(run, setup, os.devnull))
    except SystemExit:
        raise ValueError(f"{run.label}: bad `peftkit train` options {run.flags}") from None
    registry.resolve(run.method, options.method_options(options.resolve(args)))


class Progress:
    """One status line per run and phase; on a terminal the training line updates in place
    with the step and loss read from the run's metrics.jsonl."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.stream, self.index = total, stream or sys.stdout, 0
        self.tty = self.stream.isatty()

    def begin(self, label: str) -> None:
        self.index += 1
        self.label, self.started = label, time.perf_counter()

    def show(self, text: str, final: bool = False) -> None:
        line = (f"[{self.index}/{self.total}] {self.label:<16s} {text}  "
                f"({time.perf_counter() - self.started:.0f} s)")
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or not text.startswith("step"):
            self.stream.write(line + "\n")
        self.stream.flush()


def _child(argv: list[str], log_path: str, on_poll: Callable[[], None] | None = None) -> str:
    """Run `peftkit ARGV` in a child process, stderr to `log_path`; return its stdout."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # stdout goes to a file, not a pipe: a chatty child never blocks on a full pipe buffer.
    with open(log_path, "a", encoding="utf-8") as log, tempfile.TemporaryFile("w+") as out:
        log.write("$ peftkit " + " ".join(argv) + "\n")
        log.flush()
        child = subprocess.Popen([sys.executable, "-m", "peftkit.cli", *argv], env=env,
                                 stdout=out, stderr=log, text=True)
        while child.poll() is None:
            if on_poll:
                on_poll()
            time.sleep(1.0)
        out.seek(0)
        stdout = out.read()
        log.write(stdout)
    if child.returncode != 0:
        raise RuntimeError(_last_error(log_path) or f"exit status {child.returncode}")
    return stdout


def _last_error(log_path: str) -> str:
    with open(log_path, encoding="utf-8") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1][:300]


def _training_status(out_dir: str) -> str:
    try:
        with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            last = json.loads(fh.readlines()[-1])
        return f"step {last['step']}" + (f"  loss {last['loss']:.3f}" if "loss" in last else "")
    except (OSError, IndexError, ValueError, KeyError):
        return "step 0"


def execute(run: Run, setup: Setup, run_dir: str, progress: Progress) -> dict:
    """Train (unless zero-shot) and evaluate `run`; its record, with `status` "ok" or "failed"
    and `error` then. Logs go to `run_dir/log.txt`."""
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "log.txt")
    if os.path.exists(log):
        os.unlink(log)
    out_dir = os.path.join(run_dir, "output")
    record: dict[str, Any] = {"method": run.label, "train_method": run.method, "seed": run.seed,
                              "flags": run.flags, "status": "ok"}
    progress.begin(run.title)
    try:
        if run.method == ZERO_SHOT:
            progress.show("evaluating")
            result = json.loads(_child(zero_shot_argv(setup), log).strip().splitlines()[-1])
            record.update(trainable_params=0, trainable_pct=0.0, exact_match=result["exact_match"],
                          eval_loss=result["loss"], n_test=result["n"], forgetting_kl=0.0)
        else:
            progress.show("training")
            _child(train_argv(run, setup, out_dir), log,
                   lambda: progress.show(_training_status(out_dir)))
            record.update(_figures(out_dir))
        progress.show(f"exact match {record['exact_match']:.3f}  eval loss "
                      f"{record['eval_loss']:.3f}", final=True)
    except Exception as err:  # noqa: BLE001 - any failure fails this row only
        record.update(status="failed", error=str(err))
        progress.show(f"FAILED: {err}", final=True)
    return record


def _figures(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "run_summary.json"), encoding="utf-8") as fh:
        s = json.load(fh)
    final = s["final_metrics"]
    peak, start = s["peak_memory_mb"], s["memory_at_start_mb"]
    above = s["peak_memory_kind"] == "process_peak_rss" and start is not None
    return {
        "trainable_params": s["trainable_params"], "all_params": s["all_params"],
        "trainable_pct": s["trainable_percent"],
        "peak_memory_mb": None if peak is None else (peak - start if above else peak),
        "peak_memory_kind": ("process peak RSS above the loaded model" if above
                             else s["peak_memory_kind"]),
        "model_memory_mb": start, "train_seconds": s["wall_time_s"], "steps": s["steps"],
        "train_loss": final["train_loss"], "exact_match": final["test_exact_match"],
        "eval_loss": final["test_loss"], "n_test": final["test_rows"],
        "forgetting_kl": final.get("forgetting_kl"),
    }
