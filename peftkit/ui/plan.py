"""The Plan tab: `peftkit estimate --json` and `peftkit doctor --json` on the form's settings, so
the page shows exactly what the CLI says.

They run through the CLI's own entry point (`peftkit.cli.main`) inside the server, with their
output captured: the same flags, JSON and error lines as in a terminal, without paying a fresh
Python and torch start (seconds) each time a setting changes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex

from ..errors import UserError
from . import settings as form


def peftkit(argv: list[str]) -> tuple[int, str, str]:
    """`peftkit ARGV` run in this process: (exit status, stdout, stderr)."""
    from ..cli import main

    out, err = io.StringIO(), io.StringIO()
    with form.CLI_LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse rejected a flag
            status = exit.code if isinstance(exit.code, int) else 2
    return status, out.getvalue(), err.getvalue()


def warm_up() -> None:
    """Plan once with the defaults: the imports take seconds, so the page's first plan comes
    sooner."""
    plan({"method": "lora"}, ".")


def error_line(stderr: str, status: int) -> str:
    """The CLI's one-line error (`peftkit <cmd>: error: ...`), else the last line it printed."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or [f"exit status {status}"])[-1]


def _json_result(argv: list[str]) -> dict:
    """{"result": the command's JSON} (exit 0, or 1 for "does not fit" / error findings), or
    {"error": its message}."""
    status, out, err = peftkit(argv)
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
        argvs = {"estimate": form.estimate_argv(settings), "doctor": form.doctor_argv(settings)}
    except UserError as err:
        return {**out, "estimate": {"error": str(err)}, "doctor": {"error": str(err)}}
    return {**out, **{key: _json_result(argv) for key, argv in argvs.items()}}
