"""The HTTP server of `peftkit ui`: the page (static files) and a small JSON API, on the standard
library's threaded HTTP server.

API (JSON in and out; errors are `{"error": "..."}` with status 400, 403 or 404):
  GET  /api/info                     runs directory, methods, defaults
  POST /api/plan      {settings}     command line, `peftkit estimate`, `peftkit doctor`
  POST /api/runs      {settings}     start `peftkit train` (a child process)
  POST /api/stop      {"run": name}  SIGINT to that run
  GET  /api/runs                     every run and experiment under the runs directory
  GET  /api/run?run=name             one run: summary, loss series, progress, log tail
  GET  /api/file?path=rel            a PNG, Markdown or JSON file under the runs directory
  POST /api/chat      {messages, adapter, model, max_new_tokens}
  POST /api/eval      {data, adapter, model, limit, max_new_tokens}

Safety: every request must carry the token when there is one (`X-Peftkit-Token` header or
`token` query parameter); on a loopback address the Host header must name it (no DNS
rebinding); a POST must be `application/json` from no other origin (no cross-site form posts).
Runs write only under the runs directory; paths typed into the page are only read.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import mimetypes
import os
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, quote, urlsplit

from ..errors import UserError
from . import jobs, plan, runs, settings, tryout

STATIC = resources.files("peftkit.ui") / "static"
FILE_TYPES = {".png": "image/png", ".md": "text/markdown; charset=utf-8",
              ".json": "application/json"}
MAX_BODY = 1 << 20


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class App:
    """What the handlers share: the runs directory, the token, the jobs and the loaded models."""

    def __init__(self, runs_dir: str, token: str | None = None) -> None:
        self.runs_dir = os.path.abspath(runs_dir)
        self.token = token
        self.jobs = jobs.Jobs()
        self.models = tryout.Models()

    def info(self, _query) -> dict:
        from ..methods.registry import SPECS

        return {"runs_dir": self.runs_dir, "methods": list(SPECS),
                "default_model": "embedded SmolLM2-135M-Instruct"}

    def plan(self, body: dict) -> dict:
        return plan.plan(body.get("settings") or {}, self.runs_dir)

    def start(self, body: dict) -> dict:
        """Start `peftkit train`; a refusal is worded as the CLI's own."""
        values = body.get("settings") or {}
        try:
            argv = settings.train_argv(values, self.runs_dir)
            record = self.jobs.start(argv, settings.run_dir(self.runs_dir, values.get("name")))
        except UserError as err:
            raise UserError(f"peftkit train: error: {err}") from None
        return {"run": os.path.relpath(argv[-1], self.runs_dir), "command": record["command"]}

    def stop(self, body: dict) -> dict:
        self.jobs.stop(runs.inside(self.runs_dir, str(body.get("run", ""))))
        return {"stopping": body["run"]}

    def list_runs(self, _query) -> dict:
        return runs.scan(self.runs_dir)

    def run(self, query) -> dict:
        return runs.detail(self.runs_dir, _one(query, "run"))

    def chat(self, body: dict) -> dict:
        return tryout.chat(self.models, body.get("messages") or [], self._path(body, "adapter"),
                           self._path(body, "model"), body.get("max_new_tokens", 64),
                           body.get("temperature", 0.0))

    def evaluate(self, body: dict) -> dict:
        data = self._path(body, "data")
        if not data:
            raise UserError("give a data file to evaluate on")
        return tryout.evaluate(self.models, data, self._path(body, "adapter"),
                               self._path(body, "model"), body.get("limit") or None,
                               body.get("max_new_tokens", 64))

    def base(self, query) -> dict:
        return {"base": tryout.base_of(self._resolve(_one(query, "adapter")))}

    def _path(self, body: dict, key: str) -> str | None:
        value = str(body.get(key) or "").strip()
        return self._resolve(value) if value else None

    def _resolve(self, value: str) -> str:
        """A typed path: relative ones that exist under the runs directory are read there (the
        page lists runs by their name in it); others are taken as given (a model name, or a
        path relative to where the server started)."""
        under = os.path.join(self.runs_dir, value)
        return under if not os.path.isabs(value) and os.path.exists(under) else value


def _one(query: dict, key: str) -> str:
    values = query.get(key)
    if not values:
        raise UserError(f"missing query parameter {key!r}")
    return values[0]


GET = {"/api/info": App.info, "/api/runs": App.list_runs, "/api/run": App.run,
       "/api/base": App.base}
POST = {"/api/plan": App.plan, "/api/runs": App.start, "/api/stop": App.stop,
        "/api/chat": App.chat, "/api/eval": App.evaluate}


class Handler(BaseHTTPRequestHandler):
    server_version = "peftkit-ui"
    app: App  # set by `make_server`

    def log_message(self, fmt, *args) -> None:  # errors only, not one line per poll
        if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
            sys.stderr.write("peftkit ui: " + (fmt % args) + "\n")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _refuse(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _allowed(self, query: dict) -> bool:
        """The token, the Host header on loopback, and for a POST its type and origin."""
        app = self.app
        if app.token:
            given = self.headers.get("X-Peftkit-Token") or (query.get("token") or [""])[0]
            if not hmac.compare_digest(given.encode(), app.token.encode()):
                self._refuse(HTTPStatus.FORBIDDEN, "missing or wrong token: open the URL that "
                             "`peftkit ui` printed (it carries ?token=...)")
                return False
        host, port = self.server.server_address[:2]
        if is_loopback(str(host)):
            name = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if not is_loopback(name):
                self._refuse(HTTPStatus.FORBIDDEN, f"Host {name!r} is not this loopback server")
                return False
        if self.command == "POST":
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            origin = self.headers.get("Origin")
            if kind != "application/json":
                self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
                return False
            if origin and urlsplit(origin).netloc != self.headers.get("Host"):
                self._refuse(HTTPStatus.FORBIDDEN, f"requests from {origin} are refused")
                return False
        return True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._allowed(query):
            return
        if url.path in GET:
            self._call(GET[url.path], query)
        elif url.path == "/api/file":
            self._file(query)
        else:
            self._static(url.path)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if not self._allowed(parse_qs(url.query)):
            return
        if url.path not in POST:
            return self._refuse(HTTPStatus.NOT_FOUND, f"no API {url.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._refuse(HTTPStatus.BAD_REQUEST, "the body is not JSON")
        if not isinstance(body, dict):
            return self._refuse(HTTPStatus.BAD_REQUEST, "send a JSON object")
        self._call(POST[url.path], body)

    def _call(self, method, arg) -> None:
        """Run an API method: its JSON, or the error as the CLI would word it."""
        from ..cli import _input_errors

        try:
            self._json(HTTPStatus.OK, method(self.app, arg))
        except _input_errors() as err:
            self._refuse(HTTPStatus.BAD_REQUEST, str(err))
        except Exception as err:  # a bug, not the user's: keep serving, show it, log it
            traceback.print_exc()
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")

    def _file(self, query: dict) -> None:
        try:
            path = runs.inside(self.app.runs_dir, _one(query, "path"))
        except UserError as err:
            return self._refuse(HTTPStatus.FORBIDDEN, str(err))
        kind = FILE_TYPES.get(os.path.splitext(path)[1])
        if kind is None or not os.path.isfile(path):
            return self._refuse(HTTPStatus.NOT_FOUND, "no such PNG, Markdown or JSON file")
        with open(path, "rb") as fh:
            self._send(HTTPStatus.OK, fh.read(), kind)

    def _static(self, path: str) -> None:
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        item = STATIC / name
        if "/" in name or not item.is_file():
            return self._refuse(HTTPStatus.NOT_FOUND, f"no page {path}")
        body = item.read_bytes()
        if name == "index.html":  # its script and style requests must carry the token too
            token = "?token=" + quote(self.app.token) if self.app.token else ""
            body = body.replace(b"__TOKEN_QUERY__", html.escape(token).encode())
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        text = kind.startswith("text") or kind.endswith("javascript")
        self._send(HTTPStatus.OK, body, kind + ("; charset=utf-8" if text else ""))


def make_server(runs_dir: str, host: str = "127.0.0.1", port: int = 7860,
                token: str | None = None) -> ThreadingHTTPServer:
    """A server for the page (not yet serving). Another address than loopback needs a token."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} listens beyond this machine: also give --token (or set "
                        "PEFTKIT_UI_TOKEN); every request must then carry it")
    handler = type("BoundHandler", (Handler,), {"app": App(runs_dir, token)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
