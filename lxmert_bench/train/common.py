"""Small helpers the stages share: the tokenizer of a data root, the weights of a finished stage."""

from __future__ import annotations

from pathlib import Path

from lxmert_bench.config import DataConfig
from lxmert_bench.data.text import Tokenizer
from lxmert_bench.store import RunDir


def load_tokenizer(data: DataConfig) -> Tokenizer:
    """WordPiece from ``data.vocab``, else ``<root>/vocab.txt`` (offline: no hub download)."""
    path = Path(data.vocab) if data.vocab else Path(data.root) / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: vocabulary not found; put bert-base-uncased's vocab.txt there or set data.vocab"
        )
    return Tokenizer.from_vocab(path, max_length=data.max_seq_length)


def dependency_model(run_dir: RunDir, init_from: str) -> Path:
    """``checkpoints/model.pt`` of the finished stage ``init_from`` ('<kind>/<hash>')."""
    dep = run_dir.dependency(init_from)
    path = dep.checkpoint_dir / "model.pt"
    if not dep.is_done() or not path.is_file():
        raise FileNotFoundError(
            f"init_from {init_from!r}: {path} not found (that stage has not finished; "
            f"its state is {dep.disk_state()!r})"
        )
    return path
