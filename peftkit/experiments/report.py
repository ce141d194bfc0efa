"""An experiment's outputs: `results.json` (every run, and per method the mean and 95% interval over
its seeds, `stats.interval`), `results.md` (the seed's table layout: means ± interval, and each
mean as a % of the reference method's, full fine-tuning by default) and three plots with the
intervals as error bars: `quality_vs_params.png` (exact match against trainable %),
`memory_time.png` (bars) and `forgetting.png` (exact match against forgetting).

Every file is rewritten atomically after each run, so an interrupted experiment leaves the runs
it finished."""

from __future__ import annotations

import json
import os

from ..checkpoint import atomic_write_text
from .runs import ZERO_SHOT, Setup
from .stats import interval

RESULTS, TABLE = "results.json", "results.md"
PLOTS = ("quality_vs_params.png", "memory_time.png", "forgetting.png")
# the per-run figures summarized over seeds
MEASURES = ("exact_match", "eval_loss", "forgetting_kl", "train_seconds", "peak_memory_mb",
            "model_memory_mb")
# measure -> relative-figure name (the ratio of the means, method / reference)
RELATIVE = {"trainable_params": "trainable_params", "peak_memory_mb": "peak_memory",
            "train_seconds": "train_seconds", "exact_match": "exact_match",
            "eval_loss": "eval_loss"}
FIXED = ("train_method", "flags", "trainable_params", "all_params", "trainable_pct",
         "peak_memory_kind", "n_test")  # the same in every seed's run


def summarize(records: list[dict]) -> list[dict]:
    """One summary per method (in order of first appearance): the fixed facts of its runs, the
    seeds that succeeded, the errors of those that failed, and `stats.interval` of each measure
    (None where no run measured it)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, runs in by_method.items():
        ok = [r for r in runs if r["status"] == "ok"]
        first = (ok or runs)[0]
        summary = {"method": method, **{k: first.get(k) for k in FIXED},
                   "seeds": [r.get("seed") for r in ok],
                   "errors": [r.get("error", "") for r in runs if r["status"] != "ok"]}
        for key in MEASURES:
            values = [r[key] for r in ok if r.get(key) is not None]
            summary[key] = interval(values) if values else None
        out.append(summary)
    return out


def _mean(summary: dict | None, key: str) -> float | None:
    value = (summary or {}).get(key)
    return value["mean"] if isinstance(value, dict) else value


def with_relative(summaries: list[dict], reference: dict | None) -> list[dict]:
    """Each summary plus `relative`: its means divided by the reference's (None where either is
    missing or the reference's is 0)."""
    out = []
    for s in summaries:
        rel = {}
        for key, name in RELATIVE.items():
            mine, ref = _mean(s, key), _mean(reference, key)
            rel[name] = mine / ref if mine is not None and ref else None
        out.append({**s, "relative": rel})
    return out


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.2g}%"


def _figure(value: dict | None, fmt: str, unit: str = "") -> str:
    """"mean ± half-width" (the mean alone for one seed), as `fmt` formats a number."""
    if value is None:
        return "n/a"
    text = format(value["mean"], fmt)
    if value["half_width"] is not None:
        text += " ± " + format(value["half_width"], fmt)
    return text + unit


def _cell(text: str, rel: float | None, show_rel: bool) -> str:
    return f"{text} ({_pct(rel)})" if show_rel else text


def markdown(summaries: list[dict], setup: Setup, reference_label: str | None,
             command: str) -> str:
    ref = reference_label is not None
    rows = ["| method | trainable params | peak training memory | training time | "
            "exact match | eval loss | forgetting (KL) | seeds | memory before training |",
            "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if not s["seeds"] and s["errors"]:
            rows.append(f"| {s['method']} | failed: {s['errors'][-1]} | | | | | | | |")
            continue
        rel = s["relative"]
        mark = " (reference)" if s["method"] == reference_label else ""
        seeds = "—" if s["train_method"] == ZERO_SHOT else (
            f"{len(s['seeds'])}" + (f" ({len(s['errors'])} failed)" if s["errors"] else ""))
        if s["train_method"] == ZERO_SHOT:
            params = memory = time = before = "—"
        else:
            params = f"{s['trainable_params']:,} ({s['trainable_pct']:.3g}%)"
            memory = _cell(_figure(s["peak_memory_mb"], ",.0f", " MiB"), rel["peak_memory"], ref)
            time = _cell(_figure(s["train_seconds"], ".0f", " s"), rel["train_seconds"], ref)
            before = _figure(s["model_memory_mb"], ",.0f", " MiB")
        quality = _cell(_figure(s["exact_match"], ".2f"), rel["exact_match"], ref)
        rows.append(f"| {s['method']}{mark} | {params} | {memory} | {time} | {quality} | "
                    f"{_figure(s['eval_loss'], '.3f')} | {_figure(s['forgetting_kl'], '.3g')} | "
                    f"{seeds} | {before} |")
    kinds = sorted({s["peak_memory_kind"] for s in summaries if s.get("peak_memory_kind")})
    budget = (f"{setup.max_steps} steps x batch {setup.batch_size} x {setup.grad_accum} "
              f"accumulation, max length {setup.max_length}")
    notes = [
        f"Task `{setup.task}` (train `{setup.train_data}`, test `{setup.test_data}`); model "
        f"`{setup.model or 'SmolLM2-135M-Instruct (embedded default)'}`; budget {budget}.",
        "Figures: mean ± the half-width of the 95% interval over the seeds (Student's t; one "
        "seed: the figure alone). Seeds change initialization and data order, not the data.",
        "Trainable params: count and % of the model's parameters. Other percentages: the "
        "mean as a share of the reference method's" + (f" (`{reference_label}`)." if ref
                                                       else " (no reference method)."),
        f"Peak training memory: {', '.join(kinds) or 'n/a'}. Memory before training: the "
        "process with its model loaded (CPU: RSS after freed heap pages go back to the OS; CUDA: "
        "allocated). Training time: wall clock of `trainer.train()`. Exact match: greedy answers "
        "on the test split.",
        "Forgetting: mean per-token KL(untouched || trained), in nats, on the untouched model's "
        "own greedy answers to general questions (`peftkit/train/general_questions.json`); "
        "0 = no drift.",
        f"Command: `{command}`",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _point(s: dict, key: str) -> tuple[float, float]:
    value = s[key]
    return value["mean"], value["half_width"] or 0.0


def plot(summaries: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in summaries if s["seeds"]]
    trained = [s for s in done if s["train_method"] != ZERO_SHOT]
    zero = [s for s in done if s["train_method"] == ZERO_SHOT]
    paths = [os.path.join(out_dir, name) for name in PLOTS]

    def quality_axes(ax):
        for s in zero:
            ax.axhline(s["exact_match"]["mean"], linestyle="--", color="grey", label="zero-shot")
            ax.legend(loc="best")
        ax.set_ylabel("exact match (test split)")
        ax.set_ylim(-0.02, 1.02)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in trained:
        y, dy = _point(s, "exact_match")
        ax.errorbar(s["trainable_pct"], y, yerr=dy, fmt="o", capsize=3)
        ax.annotate(s["method"], (s["trainable_pct"], y), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if trained:
        ax.set_xscale("log")
        ax.margins(x=0.2)
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    quality_axes(ax)
    _save(fig, paths[0])

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [s["method"] for s in trained]
    for ax, key, title in ((axes[0], "peak_memory_mb", "peak training memory (MiB)"),
                           (axes[1], "train_seconds", "training time (s)")):
        points = [_point(s, key) if s[key] else (0.0, 0.0) for s in trained]
        ax.bar(labels, [p[0] for p in points], yerr=[p[1] for p in points], capsize=3,
               color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    _save(fig, paths[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in trained:
        if s["forgetting_kl"] is None:
            continue
        (x, dx), (y, dy) = _point(s, "forgetting_kl"), _point(s, "exact_match")
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=3)
        ax.annotate(s["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("forgetting: KL(untouched || trained) per token (nats)")
    quality_axes(ax)
    _save(fig, paths[2])
    return paths


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write(out_dir: str, setup: Setup, records: list[dict], reference_label: str | None,
          command: str) -> dict:
    """Write results.json, results.md and the plots; return the results object."""
    summaries = summarize(records)
    reference = next((s for s in summaries if s["method"] == reference_label and s["seeds"]),
                     None)
    methods = with_relative(summaries, reference)
    results = {"setup": setup.as_dict(), "command": command, "reference": reference_label,
               "methods": methods, "runs": records}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, RESULTS), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(out_dir, TABLE),
                      markdown(methods, setup, reference_label, command))
    plot(methods, out_dir)
    return results
