"""WordPiece encoding against the pure-Python BERT reference and the official padding rules."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer, WordpieceTokenizer

from lxmert_bench.data.text import Tokenizer, write_vocab

WORDS = ["what", "is", "the", "color", "of", "man", "'", "s", "shirt", "?", ".", ",", "how",
         "many", "dogs", "are", "there", "play", "##ing", "##s", "cafe", "a", "on", "left",
         "-", "2", "red", "dog", "un", "##known", "!"]
SENTENCES = [
    "What is the color of the man's shirt?",
    "How many dogs are there on the left?",
    "  PLAYING dogs, a café-cafe!  ",
    "Is the dog red?\tunknown zebra 2.",
    "[MASK] is playing",
    "",
]


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    write_vocab(WORDS, path, size=64)
    return path


def reference_pieces(vocab_path, sentence: str) -> list[str]:
    """BERT's own BasicTokenizer + WordpieceTokenizer (lower case), as the official code uses."""
    vocab = {t: i for i, t in enumerate(vocab_path.read_text().splitlines())}
    basic = BasicTokenizer(do_lower_case=True, never_split=["[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    wordpiece = WordpieceTokenizer(vocab=vocab, unk_token="[UNK]")
    return [p for word in basic.tokenize(sentence) for p in wordpiece.tokenize(word)]


def test_vocab_layout(vocab):
    lines = vocab.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert lines[5:5 + len(WORDS)] == WORDS
    assert lines[-1] == f"[unused{64 - 5 - len(WORDS) - 1}]" and len(lines) == 64
    tok = Tokenizer.from_vocab(vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 64 and tok.max_length == 20


def test_write_vocab_rejects_bad_input(tmp_path):
    assert write_vocab(["a", "b", "a", "[CLS]"], tmp_path / "v.txt") == 7  # duplicates dropped
    with pytest.raises(ValueError, match="smaller than the 7 tokens"):
        write_vocab(["a", "b"], tmp_path / "v.txt", size=6)
    with pytest.raises(ValueError, match="word #1 'two words'"):
        write_vocab(["a", "two words"], tmp_path / "v.txt")


@pytest.mark.parametrize("sentence", SENTENCES)
def test_pieces_match_bert_reference(vocab, sentence):
    tok = Tokenizer.from_vocab(vocab)
    assert tok.tokenize(sentence) == reference_pieces(vocab, sentence.strip())


def test_encode_truncates_wraps_and_pads_like_official(vocab):
    tok = Tokenizer.from_vocab(vocab, max_length=8)
    ids, mask = tok.encode("How many dogs are there?")
    pieces = ["how", "many", "dogs", "are", "there", "?"]
    assert ids == [2, *(tok.token_to_id(p) for p in pieces), 3]
    assert mask == [1] * 8
    ids, mask = tok.encode("what is the color of the man's shirt")  # 10 pieces -> first 6
    first6 = ["what", "is", "the", "color", "of", "the"]
    assert ids == [2, *(tok.token_to_id(p) for p in first6), 3] and mask == [1] * 8
    ids, mask = tok.encode("Playing?")
    assert ids == [2, tok.token_to_id("play"), tok.token_to_id("##ing"), tok.token_to_id("?"), 3,
                   0, 0, 0]
    assert mask == [1, 1, 1, 1, 1, 0, 0, 0]
    assert tok.encode("") == ([2, 3, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0])
    assert tok.encode("zebra")[0][:3] == [2, tok.unk_id, 3]


def test_encode_batch_equals_encode(vocab):
    tok = Tokenizer.from_vocab(vocab, max_length=12)
    ids, mask = tok.encode_batch(SENTENCES)
    assert ids.shape == mask.shape == (len(SENTENCES), 12) and ids.dtype == np.int64
    for k, s in enumerate(SENTENCES):
        assert (ids[k].tolist(), mask[k].tolist()) == tok.encode(s)
    empty_ids, empty_mask = tok.encode_batch([])
    assert empty_ids.shape == (0, 12)


def test_decode_and_pickle(vocab):
    tok = Tokenizer.from_vocab(vocab)
    ids, _ = tok.encode("  PLAYING dogs, a CAFÉ ")
    assert tok.decode(ids) == "playing dogs, a cafe"
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("playing dogs") == tok.encode("playing dogs")
    with pytest.raises(IndexError, match="outside the vocabulary of 64"):
        tok.id_to_token(64)


def test_missing_or_incomplete_vocab(tmp_path):
    missing = tmp_path / "vocab.txt"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: vocabulary file not found"):
        Tokenizer.from_vocab(missing)
    missing.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[CLS\], \[SEP\], \[MASK\]"):
        Tokenizer.from_vocab(missing)
    missing.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Tokenizer.from_vocab(missing)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        write_vocab(["x"], tmp_path / "v.txt")
        Tokenizer.from_vocab(tmp_path / "v.txt", max_length=1)
