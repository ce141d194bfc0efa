"""The Plan tab: `peftkit estimate --json` and `peftkit doctor --json` run as child processes on
the form's settings, so the page shows exactly what the CLI says."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from ..errors import UserError
from . import settings as form

TIMEOUT_S = 120


def peftkit(argv: list[str], timeout: float = TIMEOUT_S) -> tuple[int, str, str]:
    """Run `peftkit ARGV` in a child process: (exit status, stdout, stderr)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "peftkit.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout, done.stderr


def error_line(stderr: str, status: int) -> str:
    """The CLI's one-line error (`peftkit <cmd>: error: ...`), else the last line it printed."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or [f"exit status {status}"])[-1]


def _json_result(argv: list[str]) -> dict:
    """{"result": the command's JSON} (exit 0, or 1 for "does not fit" / error findings), or
    {"error": its message}."""
    try:
        status, out, err = peftkit(argv)
    except subprocess.TimeoutExpired:
        return {"error": f"peftkit {argv[0]} took longer than {TIMEOUT_S} s"}
    if status in (0, 1):
        try:
            return {"result": json.loads(out)}
        except ValueError:
            pass
    return {"error": error_line(err, status)}


def plan(settings: dict, runs_dir: str) -> dict:
    """The train command line, the estimate and the doctor's findings for `settings`."""
    out: dict = {}
    try:
        out["command"] = "peftkit " + shlex.join(form.train_argv(settings, runs_dir))
    except UserError as err:
        out["command_error"] = f"peftkit train: error: {err}"
    try:
        jobs = {"estimate": form.estimate_argv(settings), "doctor": form.doctor_argv(settings)}
    except UserError as err:
        return {**out, "estimate": {"error": str(err)}, "doctor": {"error": str(err)}}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(_json_result, argv) for key, argv in jobs.items()}
    out.update({key: future.result() for key, future in futures.items()})
    return out
