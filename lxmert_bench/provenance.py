"""Which code ran: recorded in every result and report, never part of a stage's identity.

A stage's identity carries the *declared* version of result-affecting code (``CODE_VERSION``),
which developers bump when results change (tests/test_code_version.py checks that they do). The
exact code is provenance: a hash of the package's sources, the git commit and a hash of any
uncommitted diff. A code snapshot (``launch.snapshot_code``) carries these in ``_provenance.json``,
since the copy a job imports from has no git checkout beside it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from lxmert_bench import __version__

# Bump when a change alters any stage's results (model, data reading, masking, losses, training,
# metrics), and record the new golden values in tests/test_code_version.py. Comments, logging,
# the CLI, scheduling and reports never need a bump.
CODE_VERSION = "r1"

PACKAGE = Path(__file__).resolve().parent
SNAPSHOT_RECORD = "_provenance.json"
SOURCE_SUFFIXES = (".py", ".yaml", ".typed")


def source_files(package: Path = PACKAGE) -> list[Path]:
    """The package's own files, in a fixed order (what a snapshot copies)."""
    return sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
                  and "__pycache__" not in p.parts)


def source_hash(package: Path = PACKAGE) -> str:
    """sha256 over the package's files (names and bytes): the exact code, 16 hex digits."""
    h = hashlib.sha256()
    for f in source_files(package):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE.parent), *args], capture_output=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None


def code_provenance() -> dict[str, Any]:
    """{"version" (declared), "package", "source_hash", "git_commit", "git_dirty" (hash of the
    uncommitted diff, or None when clean), "path" (where this code was imported from)}."""
    record = PACKAGE / SNAPSHOT_RECORD
    if record.is_file():  # a snapshot: what was true where it was taken
        found = json.loads(record.read_text(encoding="utf-8"))
        return {**found, "path": str(PACKAGE)}
    commit = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD", "--", "lxmert_bench") if commit else None
    return {
        "version": CODE_VERSION, "package": __version__, "source_hash": source_hash(),
        "git_commit": commit.strip() if commit else None,
        "git_dirty": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
        "path": str(PACKAGE),
    }
