"""WordPiece text encoding as the official LXMERT code does it, through the ``tokenizers`` library.

Official (``BertTokenizer(do_lower_case=True)`` + ``convert_sents_to_features``): lower-case, strip
accents, split on whitespace and punctuation, WordPiece; keep the first ``max_length - 2`` pieces,
add ``[CLS]``/``[SEP]``, pad with 0 to ``max_length`` (20 in every official task).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from lxmert_bench.io import atomic_write_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
DEFAULT_MAX_LENGTH = 20


class Tokenizer:
    """Lower-cased BERT WordPiece with the official truncation, special tokens and padding."""

    def __init__(self, backend: _HFTokenizer, max_length: int = DEFAULT_MAX_LENGTH,
                 source: str = "<memory>"):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks the special token(s) {', '.join(missing)}")
        self.backend = backend
        self.max_length = max_length
        self.source = source
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            backend.token_to_id(t) for t in SPECIAL_TOKENS)

    @classmethod
    def from_vocab(cls, path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
        """Load a BERT ``vocab.txt`` (one token per line, id = line number)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: vocabulary file not found (expected a BERT vocab.txt, one token per line)"
            )
        vocab = models.WordPiece.read_file(str(path))
        if not vocab:
            raise ValueError(f"{path}: vocabulary file is empty")
        # checked here: add_special_tokens below would silently append missing ones
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks the special token(s) {', '.join(missing)}")
        backend = _HFTokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
        # BertNormalizer with lowercase strips accents too, like BasicTokenizer(do_lower_case=True)
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        # the official BasicTokenizer never splits these, so "[MASK]" in a text stays one token
        backend.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(backend, max_length, str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def tokenize(self, sentence: str) -> list[str]:
        """WordPieces of ``sentence`` (no special tokens, no truncation)."""
        return self.backend.encode(sentence.strip(), add_special_tokens=False).tokens

    def token_to_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        return self.unk_id if i is None else i

    def id_to_token(self, i: int) -> str:
        token = self.backend.id_to_token(int(i))
        if token is None:
            raise IndexError(f"{self.source}: token id {i} outside the vocabulary of {self.vocab_size}")
        return token

    def _wrap(self, piece_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        ids = [self.cls_id, *piece_ids[: self.max_length - 2], self.sep_id]
        mask = [1] * len(ids)
        pad = self.max_length - len(ids)
        return ids + [self.pad_id] * pad, mask + [0] * pad

    def encode(self, sentence: str) -> tuple[list[int], list[int]]:
        """``(input_ids, attention_mask)``, both of length ``max_length``."""
        return self._wrap(self.backend.encode(sentence.strip(), add_special_tokens=False).ids)

    def encode_batch(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``input_ids`` and ``attention_mask`` of shape [N, max_length]."""
        encodings = self.backend.encode_batch([s.strip() for s in sentences],
                                              add_special_tokens=False)
        ids = np.full((len(sentences), self.max_length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sentences), self.max_length), dtype=np.int64)
        for row, enc in enumerate(encodings):
            row_ids, row_mask = self._wrap(enc.ids)
            ids[row] = row_ids
            mask[row] = row_mask
        return ids, mask

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` without special tokens, WordPieces joined (``"play ##ing"`` -> playing)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def write_vocab(words: Iterable[str], path: str | os.PathLike, size: int | None = None) -> int:
    """Write a BERT-style ``vocab.txt`` for data without a BERT vocabulary; returns its size.

    Ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then ``words`` in order (duplicates and
    special tokens dropped), then ``[unused0]``, ``[unused1]``, ... up to ``size``.
    """
    tokens = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for n, word in enumerate(words):
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary word #{n} {word!r} must be a non-empty string without spaces")
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    if size is not None:
        if size < len(tokens):
            raise ValueError(f"vocabulary size {size} is smaller than the {len(tokens)} tokens given")
        tokens += [f"[unused{i}]" for i in range(size - len(tokens))]
    atomic_write_text(path, "\n".join(tokens) + "\n")
    return len(tokens)
