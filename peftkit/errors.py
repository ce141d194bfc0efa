"""The one exception for mistakes a user can fix (a bad flag, file or value).

`peftkit.cli.main` prints it as `peftkit <command>: error: <message>` and exits 2 (`--debug`
shows the traceback instead). Its message names the file (and line) when there is one, what is
wrong and what to do.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input: the message alone tells the user what to change."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import an optional dependency, or raise a `UserError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{needed_for} needs the {module!r} package, which is not installed: "
                        f"pip install 'peftkit[{extra}]'") from None
