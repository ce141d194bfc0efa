"""`peftkit ui`: a local web page to plan, run, watch, compare and try fine-tunes; see
`peftkit.ui` and docs/ui.md."""

from __future__ import annotations

import os
from urllib.parse import quote

from ..errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("ui", help="a local web page: plan, run, watch, compare, try",
                              description=__doc__)
    p.add_argument("--runs-dir", default="runs",
                   help="where runs are started and found (default: runs)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 = any free)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1); any other needs --token")
    p.add_argument("--token", default=os.environ.get("PEFTKIT_UI_TOKEN"),
                   help="secret every request must carry (default: $PEFTKIT_UI_TOKEN)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import threading

    from ..ui import plan
    from ..ui.server import make_server

    try:
        server = make_server(args.runs_dir, args.host, args.port, args.token)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    query = "/?token=" + quote(args.token) if args.token else "/"
    print(f"peftkit ui: serving {os.path.abspath(args.runs_dir)} at http://{shown}:{port}{query}"
          " (Ctrl-C stops the server; runs keep going)", flush=True)
    threading.Thread(target=plan.warm_up, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
