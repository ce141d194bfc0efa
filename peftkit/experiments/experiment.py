"""Run a list of runs in order, writing the outputs after each one; with `resume`, the (row, seed)
runs that an earlier invocation finished for the same setup and flags are kept, not rerun."""

from __future__ import annotations

import json
import os

from . import report
from .runs import Progress, Run, Setup, check, execute


def finished(out_dir: str, setup: Setup) -> dict[tuple, dict]:
    """(label, seed) -> record of the successful runs in `out_dir/results.json` made with
    `setup`."""
    try:
        with open(os.path.join(out_dir, report.RESULTS), encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not setup.matches(old.get("setup", {})):
        return {}
    return {(r["method"], r.get("seed")): r for r in old["runs"] if r["status"] == "ok"}


def run_experiment(runs: list[Run], setup: Setup, out_dir: str, reference_label: str | None,
                   command: str, resume: bool = False, fixed: list[dict] = ()) -> dict:
    """Check every run's options, then run each (or reuse it with `resume`); return the
    results object that `report.write` wrote last. `fixed`: records measured elsewhere (with
    the same setup) shown first, e.g. the reference row of an earlier compare."""
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"runs repeat: {keys}")
    for run in runs:
        check(run, setup)
    done = finished(out_dir, setup) if resume else {}
    progress = Progress(len(runs))
    records = list(fixed)
    for run in runs:
        kept = done.get(run.key)
        if kept is not None and kept["flags"] == run.flags:
            progress.begin(run.title)
            progress.show("kept from the earlier results (--resume)", final=True)
            records.append(kept)
        else:
            records.append(execute(run, setup, os.path.join(out_dir, "runs", run.folder),
                                   progress))
        results = report.write(out_dir, setup, records, reference_label, command)
    print(f"wrote {os.path.join(out_dir, report.TABLE)}, {report.RESULTS} and "
          f"{', '.join(report.PLOTS)}")
    return results
