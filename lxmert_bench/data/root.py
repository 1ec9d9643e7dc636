"""A stage's data root, ready to read: the one place data preparation happens (the launcher
generates synthetic benchmarks once before submitting; each stage calls it again, a no-op then)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class DataSource(Protocol):
    """What of ``config.DataConfig`` decides the root (data/ sits below config, so by shape)."""

    root: str
    synthetic: bool
    synthetic_images: int
    synthetic_seed: int
    synthetic_design: str


def ensure_data_root(data: DataSource) -> Path:
    """The data root; a synthetic benchmark that is missing is generated there first (see
    :func:`~lxmert_bench.data.synthetic.ensure_synthetic_root`: only into a missing or empty
    directory, never over anyone's files). A real root must exist."""
    root = Path(data.root)
    if data.synthetic:
        from lxmert_bench.data.synthetic import ensure_synthetic_root

        ensure_synthetic_root(root, data.synthetic_images, data.synthetic_seed,
                              design=data.synthetic_design)
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root}: directory not found (expected the LXMERT data "
                                "layout; see docs/internals.md, or set data.synthetic: true)")
    return root
