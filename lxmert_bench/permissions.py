"""Who else could write into the trees a run executes from.

A job imports code from the workdir's code snapshot, submitit unpickles its ``*.pkl`` files from the
submitit folder, and stages resume from their run directories. Anyone who can write one of those
can make the next job run their code (or train on their data) as the user who submits it. So
before running or submitting, every such directory must be writable by its owner only: a
world-writable one is always refused; a group-writable one (or one owned by another user) only
when the user says the group shares the workdir on purpose (``--allow-group-write``).

New directories and files are created with the user's umask (``os.makedirs`` / ``io.py``); nothing
here changes a mode: the user decides, the tool refuses and says what to run.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["check_tree", "check_workdir", "workdir_paths"]


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _private_group(gid: int, uid: int) -> bool:
    """A user-private group (named as its user, no other member; what a 002 umask on Debian or
    Ubuntu relies on): group-writable then means writable by that user only."""
    try:
        g, user = grp.getgrgid(gid), pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return g.gr_name == user and set(g.gr_mem) <= {user}


def check_tree(paths: Iterable[str | os.PathLike], allow_group: bool = False) -> list[str]:
    """Problems with ``paths`` (each existing one, symlinks followed; missing ones are skipped:
    they will be created with the user's umask). One message per problem, naming the path and its
    mode (``drwxrwxrwx``): writable by every user (always refused); writable by its group (unless
    that is its owner's private group), or owned by another user than you or root (both refused
    unless ``allow_group``)."""
    problems: list[str] = []
    me = os.geteuid()
    seen: set[str] = set()
    for p in paths:
        path = str(p)
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append(f"{path}: cannot check its permissions ({e.strerror})")
            continue
        mode = stat.filemode(st.st_mode)
        quoted = shlex.quote(path)
        if st.st_mode & stat.S_IWOTH:
            problems.append(
                f"{path}: {mode} is writable by every user, so anyone could put code or "
                f"checkpoints there that the next job runs; refused (`chmod o-w {quoted}`)")
            continue
        if allow_group:
            continue
        if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid, st.st_uid):
            problems.append(
                f"{path}: {mode} is writable by group {_group(st.st_gid)}, so its members could put "
                f"code or checkpoints there that the next job runs; refused (`chmod g-w {quoted}`, "
                "or --allow-group-write if the group shares this workdir on purpose)")
        elif st.st_uid not in (me, 0):
            problems.append(
                f"{path}: {mode} is owned by {_user(st.st_uid)}, not you, who can change what the "
                "next job runs; refused (use a workdir of your own, or --allow-group-write if "
                "your project shares it on purpose)")
    return problems


def workdir_paths(workdir: str | os.PathLike, run_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The directories a run executes from: the workdir, its sub-directories and theirs (the
    submitit folder and its job folders, a code snapshot, ``runs/<kind>/``), and the given run
    directories with their ``checkpoints/``. Not the thousands of other run directories under
    ``runs/``: only those of the stages at hand."""
    workdir = Path(workdir)
    out = [workdir]
    for child in _subdirs(workdir):
        out.append(child)
        out.extend(_subdirs(child))
    for rd in run_dirs:
        rd = Path(rd)
        out += [rd, rd / "checkpoints"]
    return out


def check_workdir(workdir: str | os.PathLike, run_dirs: Iterable[str | os.PathLike] = (),
                  allow_group: bool = False) -> list[str]:
    """:func:`check_tree` of :func:`workdir_paths`: what ``run`` checks before submitting."""
    return check_tree(workdir_paths(workdir, run_dirs), allow_group)


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if e.is_dir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
