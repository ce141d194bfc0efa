"""The Runs tab: what `peftkit train` (metrics.jsonl, run_summary.json, checkpoint-N/,
loss_curve.png) and `peftkit compare|sweep` (results.json, results.md, plots) wrote under the
runs directory, read and never changed. A run's status comes from the files too, so runs
started from a terminal show up, and a restarted server finds its runs again."""

from __future__ import annotations

import os
import re
import time

from ..errors import UserError
from ..experiments.report import PLOTS, RESULTS, TABLE
from ..train.checkpoints import checkpoint_folders, is_complete
from ..train.metrics import CURVE, METRICS, SUMMARY, read_metrics
from . import jobs

DEPTH = 4  # runs are found this many folders deep (compare: <method>/seed-N/output)
LOG_TAIL = 40


def inside(runs_dir: str, rel: str) -> str:
    """The real path of `rel` under `runs_dir`; a path that leaves it is refused."""
    root = os.path.realpath(runs_dir)
    path = os.path.realpath(os.path.join(root, rel or "."))
    if path != root and not path.startswith(root + os.sep):
        raise UserError(f"{rel!r} is outside the runs directory {runs_dir}")
    return path


def _is_run(path: str) -> bool:
    return (any(os.path.exists(os.path.join(path, f)) for f in (SUMMARY, METRICS))
            or os.path.exists(jobs.record_path(path)))


def scan(runs_dir: str) -> dict:
    """{"runs": [summary row...], "experiments": [...]} under `runs_dir`, newest first."""
    runs, experiments = [], []
    root = os.path.realpath(runs_dir)
    if not os.path.isdir(root):
        return {"runs": [], "experiments": []}
    for folder, dirs, _ in os.walk(root):
        depth = folder[len(root):].count(os.sep)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < DEPTH)
        # a run started from the page has its record before its folder exists
        for name in os.listdir(folder):
            m = re.fullmatch(r"\.(.+)\.peftkit-ui\.json", name)
            if m and not os.path.isdir(os.path.join(folder, m.group(1))) and depth < DEPTH:
                runs.append(row(root, os.path.join(folder, m.group(1))))
        if folder == root:
            continue
        if os.path.exists(os.path.join(folder, RESULTS)):
            experiments.append(experiment(root, folder))
        if _is_run(folder):
            runs.append(row(root, folder))
    runs.sort(key=lambda r: r["modified"], reverse=True)
    return {"runs": runs, "experiments": experiments}


def _modified(path: str) -> float:
    stamps = [os.path.getmtime(p) for p in (path, jobs.record_path(path)) if os.path.exists(p)]
    return max(stamps, default=0.0)


def status(path: str, summary: dict | None, record: dict | None) -> tuple[str, dict | None]:
    """(running | starting | finished | stopped | failed | incomplete, the live holder)."""
    held = jobs.holder(path)
    if held:
        return "running", held
    if record and record.get("returncode") is None and jobs.alive(record.get("pid")):
        return "starting", {"pid": record["pid"]}
    if record and record.get("stopped") and (record.get("returncode") or not summary):
        return "stopped", None
    if summary and (not record or record.get("returncode") in (0, None)):
        return "finished", None
    if record and record.get("returncode") not in (0, None):
        return "failed", None
    return "incomplete", None


def row(root: str, path: str) -> dict:
    """One line of the runs table."""
    summary = jobs.read_json(os.path.join(path, SUMMARY))
    record = jobs.read_json(jobs.record_path(path))
    state, _ = status(path, summary, record)
    ckpts = [os.path.basename(c) for c in checkpoint_folders(path)]
    # a checkpoint whose save was interrupted (a stopped run) is listed but not offered
    interrupted = [c for c in ckpts if not is_complete(os.path.join(path, c))]
    adapters = [os.path.relpath(os.path.join(path, c), root) for c in ckpts
                if c not in interrupted
                and os.path.exists(os.path.join(path, c, "adapter_config.json"))]
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        adapters.insert(0, os.path.relpath(path, root))
    out = {"name": os.path.relpath(path, root), "status": state, "modified": _modified(path),
           "checkpoints": ckpts, "interrupted": interrupted, "adapters": adapters, "has_curve": os.path.exists(
               os.path.join(path, CURVE))}
    if summary:
        out.update({k: summary.get(k) for k in ("method", "model", "data", "steps",
                                                 "trainable_params", "trainable_percent",
                                                 "wall_time_s", "peak_memory_mb")})
        out["final_metrics"] = summary.get("final_metrics", {})
    return out


def progress(records: list[dict], started: float | None, held: dict | None,
             summary: dict | None) -> dict:
    """Step, total steps, tokens/s, elapsed and remaining seconds, memory, from the log lines
    (`time`, `max_steps`, `num_input_tokens_seen`), the live process and the summary."""
    timed = [r for r in records if "time" in r and "loss" in r]
    last = records[-1] if records else {}
    out = {"step": last.get("step", 0), "max_steps": last.get("max_steps"),
           "tokens_per_s": None, "elapsed_s": None, "remaining_s": None, "memory_mb": None}
    if len(timed) >= 2:
        first, end = timed[0], timed[-1]
        seconds = end["time"] - first["time"]
        if seconds > 0 and "num_input_tokens_seen" in end and "num_input_tokens_seen" in first:
            out["tokens_per_s"] = (end["num_input_tokens_seen"]
                                   - first["num_input_tokens_seen"]) / seconds
        if held and end["step"] > first["step"] and out["max_steps"]:
            per_step = seconds / (end["step"] - first["step"])
            out["remaining_s"] = per_step * (out["max_steps"] - end["step"])
    if summary:
        out["elapsed_s"] = summary.get("wall_time_s")
        out["memory_mb"] = summary.get("peak_memory_mb")
        out["memory_kind"] = "peak"
    elif held:
        out["elapsed_s"] = time.time() - started if started else None
        out["memory_mb"] = _rss_mb(held.get("pid"))
        out["memory_kind"] = "now"
    return out


def _rss_mb(pid: int | None) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def detail(runs_dir: str, rel: str) -> dict:
    """Everything the page shows for one run: its row, summary, loss series, progress, command
    and the tail of its log."""
    root = os.path.realpath(runs_dir)
    path = inside(runs_dir, rel)
    summary = jobs.read_json(os.path.join(path, SUMMARY))
    record = jobs.read_json(jobs.record_path(path))
    if not summary and not record and not os.path.isdir(path):
        raise UserError(f"no run {rel!r} in {runs_dir}")
    state, held = status(path, summary, record)
    records = read_metrics(path)
    started = (record or {}).get("started")
    out = row(root, path)
    out.update({
        "summary": summary,
        "command": (record or {}).get("command"),
        "returncode": (record or {}).get("returncode"),
        "loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
        "eval_loss": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
        "progress": progress(records, started, held, summary),
        "log": _tail(jobs.log_path(path)) or _tail(os.path.join(path, "log.txt")),
    })
    out["error"] = _error(out["log"]) if state == "failed" else None
    return out


def _tail(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().replace("\r", "\n").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip()][-LOG_TAIL:]


def _error(lines: list[str]) -> str | None:
    """The CLI's one-line error (`peftkit train: error: ...`), else the last line."""
    errors = [line for line in lines if re.match(r"peftkit \w+: error: ", line)]
    return (errors or lines or [None])[-1]


def experiment(root: str, path: str) -> dict:
    results = jobs.read_json(os.path.join(path, RESULTS)) or {}
    return {"name": os.path.relpath(path, root), "command": results.get("command"),
            "table": _read(os.path.join(path, TABLE)),
            "plots": [os.path.relpath(os.path.join(path, p), root) for p in PLOTS
                      if os.path.exists(os.path.join(path, p))],
            "runs": [{k: r.get(k) for k in ("method", "seed", "status", "exact_match", "train_seconds",
                                            "peak_memory_mb", "trainable_params")}
                     for r in results.get("runs", [])]}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None
