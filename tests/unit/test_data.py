"""Tokenizers: byte-level BPE and character-level (the data stage itself: test_stage.py)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.tokenizer import EOS, build_tokenizer

ROUND_TRIP = [
    "Hello world!\nSecond line.\n",
    "two  spaces,   three spaces\n\n\nand blank lines",
    "  leading and trailing whitespace \t\n",
    "def f(x):\n    return {'a': [1, 2]}  # ~`|\\^\n",
]


def corpus(*texts: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts)})


def cfg(tmp_path, **data) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **data)


def split_stream(prepared, split: str) -> np.ndarray:
    return np.concatenate([np.load(prepared.local_path(s.file))
                           for s in prepared.manifest.shards(split)])


def whole_stream(prepared) -> np.ndarray:
    return np.concatenate([split_stream(prepared, "train"), split_stream(prepared, "validation")])


# --- tokenizers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe(corpus_text):
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), corpus(corpus_text))


def test_bpe_vocab_size_and_eos(bpe):
    assert 256 < len(bpe) <= 300
    assert bpe.eos_token == EOS == "<|endoftext|>"
    assert bpe.convert_tokens_to_ids(EOS) == bpe.eos_token_id
    assert bpe.pad_token_id == bpe.eos_token_id  # batched serving pads with eos


def test_bpe_learns_merges(bpe):
    # Trained on the corpus, common words take fewer tokens than bytes.
    text = "the model token stream"
    assert len(bpe.encode(text, add_special_tokens=False)) < len(text.encode())


@pytest.mark.parametrize("text", ROUND_TRIP + ["unseen bytes: naïve café ☃ 中文"])
def test_bpe_round_trips_text(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False)
    assert bpe.decode(ids) == text


def test_char_vocab_is_distinct_chars_plus_eos(char_tok, corpus_text):
    assert len(char_tok) == len(set(corpus_text)) + 1
    assert char_tok.eos_token == EOS
    assert char_tok.convert_tokens_to_ids(EOS) == char_tok.eos_token_id


@pytest.mark.parametrize("text", ["a  b\n\nc", "x\n", "  two  spaces  ", "\n\n\n"])
def test_char_round_trips_text_exactly(text):
    tok = build_tokenizer(TokenizerConfig(kind="char"), corpus("a b c x y z two spaces\n"))
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character, newlines and spaces included
    assert tok.decode(ids) == text


def test_char_round_trips_the_corpus(char_tok, corpus_text):
    ids = char_tok.encode(corpus_text, add_special_tokens=False)
    assert char_tok.eos_token_id not in ids
    assert char_tok.decode(ids) == corpus_text
