"""Training logs on disk: every Trainer log line appended to `metrics.jsonl`, and the loss curve
(train loss, and eval loss when there is one) drawn to `loss_curve.png` at the end. Only the main
process writes."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

METRICS = "metrics.jsonl"
CURVE = "loss_curve.png"


class JsonlLogger(TrainerCallback):
    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, METRICS)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.isfile(self.path):
            plot_losses(self.path, os.path.join(os.path.dirname(self.path), CURVE))


def plot_losses(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {"loss": ([], []), "eval_loss": ([], [])}
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
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
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
