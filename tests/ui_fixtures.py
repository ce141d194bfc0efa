"""Helpers of the `peftkit ui` tests: a server in a child process and small HTTP calls."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict:
    """The children's environment: this checkout importable, one thread each (2 shared cores)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


class Server:
    """`peftkit ui --port 0` in its own process group, like a server started in a terminal."""

    def __init__(self, runs_dir: str, *extra: str, log: str) -> None:
        self.log = log
        with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "peftkit.cli", "ui", "--runs-dir", runs_dir, "--port", "0",
                 *extra], stdout=out, stderr=subprocess.STDOUT, env=env(),
                start_new_session=True)
        found = wait_for(self._address, timeout=120, every=0.2)
        self.url, self.page = found.group(1), found.group(1) + found.group(2)

    def _address(self):
        """the server's address"""
        if self.proc.poll() is not None:
            raise RuntimeError(f"peftkit ui exited: {open(self.log).read()}")
        return re.search(r"(http://\S+?)(/\?token=\S+|/) ", open(self.log).read())

    def ctrl_c(self) -> int:
        """Ctrl-C as a terminal sends it: SIGINT to the server's process group; its status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def call(url: str, body: dict | None = None, headers: dict | None = None,
         timeout: float = 300) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET, or of a JSON POST when `body` is given."""
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_for(check, timeout: float = 300, every: float = 0.5):
    """Poll `check()` until it returns something truthy; that value (or AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {check.__doc__ or check}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
