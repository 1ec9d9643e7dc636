"""Who owns a temporary file or a lock: this host and a pid, and whether that owner is still alive.

Temporaries are named ``<name>.tmp-<host>-<pid>`` so that a later run can remove one only when its
owner is known dead: same host, pid gone. Never by age or name pattern alone, since on a shared
filesystem another machine's live process may be writing it.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
        return False


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot): with the pid, it names the
    process, so a reused pid is not mistaken for the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError, PermissionError):
        return None


def temp_name(name: str) -> str:
    """A temporary sibling's name for ``name``, owned by this process on this host."""
    return f".{name}.tmp-{HOST}-{os.getpid()}"


def remove_dead_temporaries(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` (see :func:`temp_name`) left by dead processes of this
    host; returns what was removed. Temporaries of other hosts or of live processes stay."""
    prefix = f".{target.name}.tmp-"
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        host, _, pid = p.name[len(prefix):].rpartition("-")
        if host != HOST or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def owned_temp_dir(target: Path) -> Path:
    """A new directory :func:`temp_name` of ``target``, beside it, after removing the temporaries
    dead processes of this host left there. Created with the user's umask, like the directory it
    becomes (``tempfile.mkdtemp`` would make it private, 0700, and leave random names behind)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(target)
    tmp = target.parent / temp_name(target.name)
    if tmp.exists():  # this very process left it (an earlier failure): it is ours to replace
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` to disk, so a rename that publishes it never
    survives a crash that its contents did not."""
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def same_process(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that had ``start_time``."""
    return pid_alive(pid) and process_start_time(pid) == start_time


def publish_directory(target: Path, fill: Callable[[Path], None]) -> bool:
    """Build a directory in a temporary sibling owned by this process (:func:`temp_name`) with
    ``fill(tmp)``, then rename it to ``target``, so no reader sees half of it. Temporaries of dead
    owners are removed first; on failure (a full disk, a signal) this one is removed too.

    An empty ``target`` is replaced; one that another process published meanwhile wins and this
    copy is dropped (returns False). Callers check beforehand that ``target`` holds no one else's
    files, so nothing of anyone's is removed: ``rmdir`` fails rather than remove a file.
    """
    tmp = owned_temp_dir(target)
    try:
        fill(tmp)
        fsync_tree(tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            shutil.rmtree(tmp)
            return False
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
