"""`peftkit.outdir` with real processes: a held folder refuses a second claim and names the
holder, a `kill -9`ed holder's lock is taken over, and a `publish` killed at each of its steps
leaves the old folder or the new one, never a mix, with every leftover removed by the next claim.
Also: files of the atomic writer follow the umask."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from peftkit import checkpoint, outdir

HOLD = """
import sys, time
from peftkit import outdir
with outdir.claim(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold(path):
    """A child process holding `path`; returns once it holds it."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "held\n"
    return child


def kill9(child):
    child.kill()  # SIGKILL: no finally, no atexit
    child.wait()


def tree(path) -> dict[str, bytes]:
    """Every file under `path` by relative name, with its bytes."""
    files = (os.path.join(folder, f) for folder, _, names in os.walk(path) for f in names)
    return {os.path.relpath(f, path): open(f, "rb").read() for f in files}


def test_a_held_folder_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(
        tmp_path, capsys):
    out = tmp_path / "run"
    child = hold(out)
    try:
        with pytest.raises(outdir.OutputDirBusy, match=rf"in use by `test holder` \(pid "
                                                       rf"{child.pid} on .*, started "):
            with outdir.claim(out, "second"):
                pass
    finally:
        kill9(child)
    assert os.path.exists(outdir.sibling(out, "lock"))  # left behind by the killed holder
    with outdir.claim(out, "third"):
        err = capsys.readouterr().err
        assert f"taking over the lock of `test holder` (pid {child.pid}" in err
    assert sorted(os.listdir(tmp_path)) == []  # released: the lock file is gone
    with outdir.claim(out, "fourth"):  # a cleanly released lock gives no note
        assert capsys.readouterr().err == ""


def test_publish_replaces_the_folder_and_a_failed_block_leaves_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with outdir.claim(out, "t"):
        with pytest.raises(RuntimeError):
            with outdir.publish(out) as tmp:
                (open(os.path.join(tmp, "new.txt"), "w")).write("new")
                raise RuntimeError("failed half way")
        assert tree(out) == {"old.txt": b"old"}
        with outdir.publish(out) as tmp:
            os.mkdir(os.path.join(tmp, "sub"))
            open(os.path.join(tmp, "sub", "new.txt"), "w").write("new")
    assert tree(out) == {os.path.join("sub", "new.txt"): b"new"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_symlinked_output_folder_keeps_its_link(tmp_path):
    """`runs/x -> /data/x`: the target folder is replaced and emptied, the link stays, and the
    next claim finds nothing to clean."""
    real = tmp_path / "disk" / "x"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    (tmp_path / "runs").mkdir()
    link = tmp_path / "runs" / "x"
    link.symlink_to(real)
    with outdir.claim(link, "t"):
        with outdir.publish(link) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.path.islink(link) and tree(link) == {"new.txt": b"new"}
    with outdir.claim(link, "t"):
        outdir.move_aside(link)
        assert os.path.islink(link) and tree(link) == {}
        outdir.drop_replaced(link)
    assert os.listdir(tmp_path / "runs") == ["x"] and os.listdir(tmp_path / "disk") == ["x"]


CRASH = """
import os, signal, sys
from peftkit import outdir

path, point = sys.argv[1:]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
real_exchange, real_rename = outdir._exchange, os.rename
if point == "before-swap":
    outdir._replace = die
if point == "after-exchange":
    outdir._exchange = lambda a, b: real_exchange(a, b) and die()
if point.startswith("fallback"):
    outdir._exchange = lambda a, b: False
if point == "fallback-between-renames":
    renames = []
    os.rename = lambda a, b: die() if renames else renames.append(real_rename(a, b))
if point == "fallback-after-renames":
    outdir.shutil.rmtree = die
with outdir.claim(path, "crash test"):
    with outdir.publish(path) as tmp:
        open(os.path.join(tmp, "a"), "w").write("new a")
        if point == "writing":
            die()
        open(os.path.join(tmp, "b"), "w").write("new b")
"""
OLD = {"a": b"old a", "b": b"old b", "only-old": b"1"}
NEW = {"a": b"new a", "b": b"new b"}


@pytest.mark.parametrize("point, after_crash, after_cleanup", [
    ("writing", OLD, OLD),
    ("before-swap", OLD, OLD),
    ("after-exchange", NEW, NEW),
    ("fallback-between-renames", None, OLD),  # folder briefly gone; the next claim restores it
    ("fallback-after-renames", NEW, NEW),
])
def test_publish_killed_at_each_step_leaves_old_or_new(tmp_path, point, after_crash,
                                                       after_cleanup):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in OLD.items():
        (out / name).write_bytes(data)
    child = subprocess.run([sys.executable, "-c", CRASH, str(out), point], timeout=120)
    assert child.returncode == -9
    assert (tree(out) if out.exists() else None) == after_crash
    assert len(os.listdir(tmp_path)) > 1  # the lock and temporaries of the killed child
    with outdir.claim(out, "next run"):
        assert tree(out) == after_cleanup
        assert sorted(os.listdir(tmp_path)) == [".out.peftkit-lock", "out"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writer_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        checkpoint.save_tensors({"w": torch.ones(2)}, str(tmp_path / checkpoint.WEIGHTS_NAME))
        checkpoint.atomic_write_text(str(tmp_path / "a.json"), "{}")
        with outdir.claim(tmp_path / "pub", "t"), outdir.publish(tmp_path / "pub") as tmp:
            open(os.path.join(tmp, "f"), "w").close()
    finally:
        os.umask(previous)
    for name in (checkpoint.WEIGHTS_NAME, "a.json", "pub/f"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    assert stat.S_IMODE(os.stat(tmp_path / "pub").st_mode) == 0o777 & ~umask


def test_claim_removes_the_atomic_writers_leftover_temporaries(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    leftover = out / "checkpoint-2" / f".adapter_model.safetensors.1a2b3c4d{outdir.TMP_SUFFIX}"
    leftover.write_bytes(b"half")
    (out / ".keep.tmp").write_text("not ours")
    with outdir.claim(out, "t"):
        assert not leftover.exists() and (out / ".keep.tmp").exists()
