"""`peftkit ui`: a local web page over peftkit's CLI and files.

settings.py  the form as `peftkit train|estimate|doctor` command lines
plan.py      Plan: `peftkit estimate --json` and `peftkit doctor --json` child processes
jobs.py      Run: `peftkit train` children that outlive the page and the server; stop
runs.py      Runs: what train and compare/sweep wrote, read only
tryout.py    Try: chat with an adapter and its base, eval with per-row exact match
server.py    the HTTP server (standard library) and its JSON API; static/ the page
"""
