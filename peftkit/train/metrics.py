"""Training logs on disk: every Trainer log line appended to `metrics.jsonl` (with the wall-clock
`time` and the run's `max_steps`, for live progress); the loss curve
(train loss, and eval loss when there is one) drawn to `loss_curve.png` once the run is saved,
when matplotlib is installed; the mean training loss of a whole run, resumed or not. Only the
main process writes."""

from __future__ import annotations

import json
import os
import sys
import time

from transformers import TrainerCallback

METRICS = "metrics.jsonl"
CURVE = "loss_curve.png"
SUMMARY = "run_summary.json"


def read_metrics(output_dir: str) -> list[dict]:
    """The records of `output_dir/metrics.jsonl` (none if it is missing); a last line still being
    written by a live run is left out."""
    try:
        with open(os.path.join(output_dir, METRICS), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip().endswith("}")]
    except OSError:
        return []


class JsonlLogger(TrainerCallback):
    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, METRICS)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                      "max_steps": state.max_steps, **logs}
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


class LogAtCheckpoints(TrainerCallback):
    """Log the loss at every checkpoint, so that a checkpoint's `log_history` covers all its
    steps and a run resumed from it can report the loss of the whole run (`run_loss`)."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = control.should_log or control.should_save

    on_epoch_end = on_step_end


def _loss_sum(log_history: list[dict], up_to: int) -> tuple[float, int]:
    """(sum of the step losses, steps covered) from logged window means up to step `up_to`."""
    total, last = 0.0, 0
    for record in log_history:
        if "loss" in record and record["step"] <= up_to:
            total += record["loss"] * (record["step"] - last)
            last = record["step"]
    return total, last


def loss_before(checkpoint: str | None) -> tuple[float, int]:
    """(sum of the step losses, number of steps) of the run up to `checkpoint`, read before
    training (which may rotate the checkpoint away); (0.0, 0) without one. A checkpoint whose
    log stops short of its step (written without `LogAtCheckpoints`) counts as none, with a
    warning."""
    if not checkpoint:
        return 0.0, 0
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    total, covered = _loss_sum(state["log_history"], state["global_step"])
    if covered != state["global_step"]:
        print(f"peftkit train: warning: train_loss will cover the resumed steps only "
              f"({checkpoint} has no loss logged for steps {covered + 1}-"
              f"{state['global_step']})", file=sys.stderr, flush=True)
        return 0.0, 0
    return total, covered


def run_loss(training_loss: float, global_step: int, before: tuple[float, int]) -> float:
    """The mean loss over every step of the run: transformers' `training_loss` covers only the
    steps of this process, `before` (from `loss_before`) the steps before a resume."""
    total, steps = before
    if not steps:
        return training_loss
    return (total + training_loss * (global_step - steps)) / global_step


def draw_loss_curve(output_dir: str) -> None:
    """`loss_curve.png` from `metrics.jsonl`; without matplotlib, a warning instead."""
    try:
        import matplotlib
    except ImportError:
        print(f"peftkit train: warning: no {CURVE} (matplotlib is not installed; "
              "pip install 'peftkit[train]')", file=sys.stderr, flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {"loss": ([], []), "eval_loss": ([], [])}
    for record in read_metrics(output_dir):
        for key, (xs, ys) in series.items():
            if key in record:
                xs.append(record["step"])
                ys.append(record[key])
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="." if key == "eval_loss" else None,
                    label="train" if key == "loss" else "eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if any(xs for xs, _ in series.values()):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, CURVE), dpi=100)
    plt.close(fig)


def available_report_to(name: str) -> str:
    """`name` (a --report-to tracker) when its package is installed, else "none" and a
    warning: a missing tracker must not stop a run."""
    from transformers.integrations import integration_utils as hub

    available = {"tensorboard": hub.is_tensorboard_available, "wandb": hub.is_wandb_available,
                 "trackio": hub.is_trackio_available}
    if name == "none" or available[name]():
        return name
    print(f"peftkit train: warning: --report-to {name} ignored: the {name!r} package is not "
          f"installed (pip install {name})", file=sys.stderr, flush=True)
    return "none"
