"""Output folders that belong to one command at a time and change all at once.

For an output folder `runs/x`, peftkit keeps hidden siblings in `runs/`:

- `.x.peftkit-lock`: held (`flock`) by the command writing `runs/x` (`claim`). It holds the
  holder's pid, host, command and start time, which a refused command prints. The kernel drops
  the lock when its process dies, so a lock file left by a killed command is stale and the next
  claim takes it over with a note.
- `.x.peftkit-tmp-*`: a folder being written by `publish`. It replaces `runs/x` in one
  rename (`renameat2(RENAME_EXCHANGE)`; where the file system refuses it, two renames through
  `.x.peftkit-old-*`, which the next claim undoes if it finds `runs/x` missing).
- `.x.peftkit-replaced`: the contents an `--overwrite` run moved aside (`move_aside`). They stay
  recoverable until that run's first complete save (`drop_replaced`).

`claim` removes leftover `-tmp`/`-old` siblings and the temporary files of
`peftkit.checkpoint`'s atomic writer inside the folder: while the lock is held, nothing else
writes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
from typing import Iterator

TMP_SUFFIX = ".peftkit-tmp"  # the atomic file writer's temporary files end with it


class OutputDirBusy(ValueError):
    """The output folder is held by another command (a user error: exit 2)."""


def sibling(path: str | os.PathLike, kind: str) -> str:
    """`runs/.x.peftkit-<kind>` for `path` = `runs/x` (a symlink's target: the link stays)."""
    parent, name = os.path.split(os.path.realpath(path))
    return os.path.join(parent, f".{name}.peftkit-{kind}")


def _holder(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
    try:
        return (f"`{holder['command']}` (pid {holder['pid']} on {holder['host']}, started "
                f"{holder['started']})")
    except (KeyError, TypeError):
        return "another peftkit command"


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _lock(path: str, lock_path: str) -> tuple[int, dict | None]:
    """flock `lock_path` (created if missing); return the fd and the previous holder's record,
    or raise OutputDirBusy naming the holder of `path`. Retries when the file was unlinked by
    its releasing holder between our open and our flock (we would hold a lock nobody sees)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirBusy(
                f"{path} is in use by {_describe(holder)}"
                f" (lock file {lock_path}); wait for it to finish or choose another output "
                "folder") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_holder(fd)
        os.close(fd)


@contextlib.contextmanager
def claim(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold output folder `path` for `command` (e.g. "peftkit train") while the block runs.

    Raises OutputDirBusy, naming the holder, when another process holds it. A lock left by a
    dead process is taken over with a note on stderr. Leftover temporaries of a killed command
    are cleaned up (module docstring)."""
    path = os.path.realpath(path)
    lock_path = sibling(path, "lock")
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    fd, previous = _lock(str(path), lock_path)
    try:
        if previous is not None:
            print(f"peftkit: note: taking over the lock of {_describe(previous)}, which is no "
                  f"longer running", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(command)).encode(), 0)
        os.fsync(fd)
        _clean(path)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def _clean(path: str | os.PathLike) -> None:
    """Remove what a killed command left: `-tmp` siblings, `-old` siblings (restored when
    `path` is missing: the swap died between its two renames) and writer temporaries."""
    parent, name = os.path.split(os.path.realpath(path))
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(f".{name}.peftkit-tmp-"):
            _remove(os.path.join(parent, entry))
        elif entry.startswith(f".{name}.peftkit-old-"):
            if os.path.lexists(path):
                _remove(os.path.join(parent, entry))
            else:
                os.rename(os.path.join(parent, entry), path)
    if os.path.isdir(path):
        for folder, _, files in os.walk(path):
            for file in files:
                if file.startswith(".") and file.endswith(TMP_SUFFIX):
                    os.unlink(os.path.join(folder, file))


def _remove(path: str) -> None:
    """Delete a folder tree, or only the link where `path` is a symlink."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def _finish_tree(path: str) -> None:
    """Give every file under `path` the mode of a file the user creates (0666 & ~umask, read
    from `path`'s own 0777 & ~umask: safetensors writes its files 0600) and flush all to disk."""
    mode = os.stat(path).st_mode & 0o666
    for folder, _, files in os.walk(path):
        for file in files:
            with open(os.path.join(folder, file), "rb") as fh:
                os.fchmod(fh.fileno(), mode)
                os.fsync(fh.fileno())
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap folders `a` and `b` in one step (Linux renameat2); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _replace(new: str, path: str) -> None:
    """Put folder `new` at `path`, replacing the folder there: after a crash `path` is the old
    folder or the new one (the two-rename fallback: once the next `claim` has cleaned up)."""
    parent = os.path.dirname(path)
    if not os.path.lexists(path):
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the old folder
    else:
        old = sibling(path, f"old-{secrets.token_hex(4)}")
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    _fsync_dir(parent)


@contextlib.contextmanager
def publish(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary sibling folder of `path`; when the block succeeds, give its files
    the umask's mode, flush it and rename it into place over `path` (module docstring). If the
    block fails, the temporary folder is removed and `path` is untouched. Hold `claim(path)`
    around it."""
    path = os.path.realpath(path)
    tmp = sibling(path, f"tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # mode 0777 & ~umask, like any folder the user creates
    try:
        yield tmp
        _finish_tree(tmp)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_aside(path: str | os.PathLike) -> None:
    """Empty `path` for an `--overwrite` run: its contents go to the `-replaced` sibling. If one
    is there already, an earlier `--overwrite` run never completed a save: the contents it
    replaced stay, and that run's partial output in `path` is deleted."""
    path = os.path.realpath(path)
    replaced = sibling(path, "replaced")
    if os.path.lexists(replaced):
        old = sibling(path, f"old-{secrets.token_hex(4)}")
        os.rename(path, old)
        os.mkdir(path)
        shutil.rmtree(old)
    else:
        os.rename(path, replaced)
        os.mkdir(path)
    _fsync_dir(os.path.dirname(path))


def drop_replaced(path: str | os.PathLike) -> None:
    """Delete what `move_aside` kept (call after the new run's first complete save)."""
    replaced = sibling(path, "replaced")
    if os.path.lexists(replaced):
        old = sibling(path, f"old-{secrets.token_hex(4)}")
        os.rename(replaced, old)  # gone at once; a crash in rmtree leaves an -old to clean up
        shutil.rmtree(old)
