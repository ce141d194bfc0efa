"""Training runs started from the page: `peftkit train` child processes that outlive the page and
the server.

A child runs in its own session (its own process group), with no stdin and its output in a
log file, so closing the page or stopping the server (even with Ctrl-C) leaves it training.
Beside its output folder `runs/x` the page keeps two files, next to `outdir`'s lock:
`.x.peftkit-ui.json` (the command, pid, start time and, once the server saw it end, the exit
status) and `.x.peftkit-ui.log` (the child's stdout and stderr).

Stopping sends SIGINT to the child's process group (as Ctrl-C in a terminal would): training
ends between steps, the `outdir` lock is released and the last complete checkpoint stays for
`--resume`. A child still running `GRACE_S` later gets SIGTERM.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import signal
import sys
import threading
import time

from .. import outdir
from ..checkpoint import atomic_write_text
from ..errors import UserError

GRACE_S = 20.0


def record_path(out: str) -> str:
    return outdir.sibling(out, "ui.json")


def log_path(out: str) -> str:
    return outdir.sibling(out, "ui.log")


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """True when `pid` runs a peftkit command on this machine (a reused pid does not count)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"peftkit" in cmdline and state != "Z"


def holder(out: str) -> dict | None:
    """The record of the live process holding `out` (`outdir.claim`'s lock file), else None.
    Read only: taking the lock, even for a moment, could refuse a run that starts then."""
    found = read_json(outdir.sibling(out, "lock"))
    if found and found.get("host") == os.uname().nodename and alive(found.get("pid")):
        return found
    return None


def spawn(argv: list[str], log: str, env: dict) -> int:
    """Start `argv` in a new session with stdin from /dev/null and stdout and stderr appended to
    `log`; its pid. SIGINT is reset to its default, so the child's Python turns it into
    KeyboardInterrupt even when this server ignores it (as a shell's background job does)."""
    return os.posix_spawn(argv[0], argv, env, setsid=True, setsigdef=[signal.SIGINT],
                          file_actions=[
                              (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_APPEND, 0),
                              (os.POSIX_SPAWN_DUP2, 1, 2)])


class Jobs:
    """Starts and stops `peftkit train` children; waits for them (no zombies) while it lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def start(self, argv: list[str], out: str) -> dict:
        """Start `peftkit ARGV` (a train command writing `out`); its record. A folder held by a
        live command is refused with the holder named, as `peftkit train` itself would."""
        held = holder(out)
        if held:
            raise UserError(f"{out} is in use by `{held.get('command')}` (pid {held.get('pid')}, "
                            f"started {held.get('started')}); wait for it to finish, stop it, or "
                            "choose another run name")
        with self._lock:
            previous = read_json(record_path(out))
            if previous and previous.get("returncode") is None and alive(previous.get("pid")):
                raise UserError(f"{out} has a run starting (pid {previous['pid']}); wait for it "
                                "or stop it")
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
            with open(log_path(out), "w", encoding="utf-8") as log:
                log.write("$ peftkit " + shlex.join(argv) + "\n")
            pid = spawn([sys.executable, "-m", "peftkit.cli", *argv], log_path(out), env)
            record = {"argv": argv, "command": "peftkit " + shlex.join(argv), "pid": pid,
                      "started": time.time(), "returncode": None, "stopped": None}
            self._write(out, record)
        threading.Thread(target=self._wait, args=(pid, out), daemon=True).start()
        return record

    def _write(self, out: str, record: dict) -> None:
        atomic_write_text(record_path(out), json.dumps(record) + "\n")

    def _wait(self, pid: int, out: str) -> None:
        returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        with self._lock:
            record = read_json(record_path(out)) or {}
            if record.get("pid") == pid:
                self._write(out, {**record, "returncode": returncode, "ended": time.time()})

    def stop(self, out: str) -> dict:
        """SIGINT to the run's process group (then SIGTERM after GRACE_S); the record."""
        with self._lock:
            record = read_json(record_path(out))
            if not record or record.get("returncode") is not None or not alive(record.get("pid")):
                raise UserError(f"{out} has no run started from this page in progress")
            pid = record["pid"]
            os.killpg(pid, signal.SIGINT)
            record["stopped"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            self._write(out, record)
        timer = threading.Timer(GRACE_S, self._terminate, args=(pid,))
        timer.daemon = True
        timer.start()
        return record

    @staticmethod
    def _terminate(pid: int) -> None:
        if alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
