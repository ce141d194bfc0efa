"""An experiment's outputs: `results.json`, `results.md` (the seed's table layout: absolute figures
and each as a % of the reference run, full fine-tuning by default) and two plots,
`quality_vs_params.png` (exact match against trainable %) and `memory_time.png` (bars).

Every file is rewritten atomically after each run, so an interrupted experiment leaves the rows
it finished."""

from __future__ import annotations

import json
import os

from ..checkpoint import atomic_write_text
from .runs import ZERO_SHOT, Setup

RESULTS, TABLE = "results.json", "results.md"
PLOTS = ("quality_vs_params.png", "memory_time.png")
# record field -> relative-figure name (the ratio run / reference)
RELATIVE = {"trainable_params": "trainable_params", "peak_memory_mb": "peak_memory",
            "train_seconds": "train_seconds", "exact_match": "exact_match",
            "eval_loss": "eval_loss"}


def with_relative(records: list[dict], reference: dict | None) -> list[dict]:
    """Each record plus `relative`: its figures divided by the reference's (None where either
    is missing or the reference's is 0)."""
    out = []
    for record in records:
        rel = {}
        for key, name in RELATIVE.items():
            mine, ref = record.get(key), (reference or {}).get(key)
            rel[name] = mine / ref if mine is not None and ref else None
        out.append({**record, "relative": rel})
    return out


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.2g}%"


def _cell(text: str, rel: float | None, show_rel: bool) -> str:
    return f"{text} ({_pct(rel)})" if show_rel else text


def markdown(records: list[dict], setup: Setup, reference_label: str | None,
             command: str) -> str:
    ref = reference_label is not None
    rows = ["| method | trainable params | peak training memory | training time | "
            "exact match | eval loss | memory before training |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            rows.append(f"| {r['method']} | failed: {r.get('error', '')} | | | | | |")
            continue
        rel = r["relative"]
        mark = " (reference)" if r["method"] == reference_label else ""
        if r["train_method"] == ZERO_SHOT:
            params = memory = time = before = "—"
        else:
            params = f"{r['trainable_params']:,} ({r['trainable_pct']:.3g}%)"
            memory = _cell(f"{r['peak_memory_mb']:,.0f} MiB", rel["peak_memory"], ref)
            time = _cell(f"{r['train_seconds']:.0f} s", rel["train_seconds"], ref)
            loaded = r.get("model_memory_mb")
            before = "n/a" if loaded is None else f"{loaded:,.0f} MiB"
        quality = _cell(f"{r['exact_match']:.2f}", rel["exact_match"], ref)
        rows.append(f"| {r['method']}{mark} | {params} | {memory} | {time} | {quality} | "
                    f"{r['eval_loss']:.3f} | {before} |")
    kinds = sorted({r["peak_memory_kind"] for r in records if r.get("peak_memory_kind")})
    budget = (f"{setup.max_steps} steps x batch {setup.batch_size} x {setup.grad_accum} "
              f"accumulation, max length {setup.max_length}, seed {setup.seed}")
    notes = [
        f"Task `{setup.task}` (train `{setup.train_data}`, test `{setup.test_data}`); model "
        f"`{setup.model or 'SmolLM2-135M-Instruct (embedded default)'}`; budget {budget}.",
        "Trainable params: count and % of the model's parameters. Other percentages: the "
        "figure as a share of the reference run's" + (f" (`{reference_label}`)." if ref
                                                      else " (no reference run)."),
        f"Peak training memory: {', '.join(kinds) or 'n/a'}. Memory before training: the "
        "process with its model loaded (CPU: RSS; CUDA: allocated). Training time: wall clock of "
        "`trainer.train()`. Exact match: greedy answers on the test split.",
        f"Command: `{command}`",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot(records: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["status"] == "ok"]
    trained = [r for r in done if r["train_method"] != ZERO_SHOT]
    paths = [os.path.join(out_dir, name) for name in PLOTS]

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in trained:
        ax.scatter(r["trainable_pct"], r["exact_match"])
        ax.annotate(r["method"], (r["trainable_pct"], r["exact_match"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r in done:
        if r["train_method"] == ZERO_SHOT:
            ax.axhline(r["exact_match"], linestyle="--", color="grey", label="zero-shot")
            ax.legend(loc="best")
    if trained:
        ax.set_xscale("log")
        ax.margins(x=0.2)
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("exact match (test split)")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(paths[0] + ".tmp.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [r["method"] for r in trained]
    for ax, key, title in ((axes[0], "peak_memory_mb", "peak training memory (MiB)"),
                           (axes[1], "train_seconds", "training time (s)")):
        ax.bar(labels, [r[key] or 0 for r in trained], color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(paths[1] + ".tmp.png", dpi=120)
    plt.close(fig)
    for path in paths:
        os.replace(path + ".tmp.png", path)
    return paths


def write(out_dir: str, setup: Setup, records: list[dict], reference_label: str | None,
          command: str) -> dict:
    """Write results.json, results.md and the plots; return the results object."""
    reference = next((r for r in records
                      if r["method"] == reference_label and r["status"] == "ok"), None)
    rows = with_relative(records, reference)
    results = {"setup": setup.as_dict(), "command": command, "reference": reference_label,
               "runs": rows}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, RESULTS), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(out_dir, TABLE),
                      markdown(rows, setup, reference_label, command))
    plot(rows, out_dir)
    return results
