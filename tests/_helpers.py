"""Small set-ups several test files share (imported as ``from _helpers import ...``: pytest puts
tests/ on sys.path, as for _slurm_stages.py)."""

from __future__ import annotations

import socket
from typing import Any

from lxmert_bench.config import DataConfig
from lxmert_bench.data.root import ensure_data_root


def synthetic_data(tmp_path_factory: Any, images: int = 120, **data: Any) -> DataConfig:
    """A small synthetic benchmark generated now in a fresh temporary directory."""
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("data") / "syn"), synthetic=True,
                     synthetic_images=images, **data)
    ensure_data_root(cfg)
    return cfg


def free_port() -> int:
    """A TCP port free on the loopback now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
