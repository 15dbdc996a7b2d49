"""Data stage: tokenizers, packing + split + fingerprint cache, and the worker-side shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

import lmforge.data.packing as packing
from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import PreparedData, prepare_data
from lmforge.data.manifest import Shard
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


# --- prepare_data: packing, split, cache -------------------------------------------------


@pytest.fixture
def two_docs(tmp_path, make_text):
    d = tmp_path / "docs"
    d.mkdir()
    a, b = make_text(1, paragraphs=4), make_text(2, paragraphs=4)
    (d / "a.txt").write_text(a)
    (d / "b.txt").write_text(b)
    return d, a, b


CHAR = TokenizerConfig(kind="char")


def test_documents_are_separated_by_eos(tmp_path, two_docs):
    d, a, b = two_docs
    prepared = prepare_data(cfg(tmp_path, path=str(d), sample_by="document"), CHAR, 16)
    stream = whole_stream(prepared)
    assert prepared.tokenizer().decode(stream) == a + EOS + b + EOS
    assert list(np.flatnonzero(stream == prepared.eos_id)) == [len(a), len(a) + 1 + len(b)]


def test_sample_by_line_makes_one_document_per_line(tmp_path):
    text = "first line\nsecond line\nthird line\n" * 20
    (tmp_path / "lines.txt").write_text(text)
    prepared = prepare_data(cfg(tmp_path, path=str(tmp_path / "lines.txt"), sample_by="line"),
                            CHAR, 8)
    stream = whole_stream(prepared)
    assert int((stream == prepared.eos_id).sum()) == 60


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.3])
def test_split_sizes_follow_val_fraction(tmp_path, two_docs, val_fraction):
    d, a, b = two_docs
    prepared = prepare_data(cfg(tmp_path, path=str(d), val_fraction=val_fraction), CHAR, 16)
    total = len(a) + len(b) + 2
    assert prepared.train_tokens + prepared.val_tokens == total
    assert prepared.val_tokens == int(total * val_fraction)
    assert len(split_stream(prepared, "train")) == prepared.train_tokens
    assert len(split_stream(prepared, "validation")) == prepared.val_tokens
    # Validation is the tail of the stream.
    tail = prepared.tokenizer().decode(split_stream(prepared, "validation"))
    assert (a + EOS + b + EOS).endswith(tail)


def test_prepared_data_describes_its_files(tmp_path, two_docs):
    d, _, _ = two_docs
    prepared = prepare_data(cfg(tmp_path, path=str(d)), CHAR, 16)
    entry = Path(prepared.entry)
    assert entry == tmp_path / "cache" / prepared.fingerprint
    assert prepared.vocab_size == len(prepared.tokenizer())
    assert prepared.eos_id == prepared.tokenizer().eos_token_id
    assert prepared.tokenizer_dir == str(entry / "tokenizer")
    # The manifest layout (data/manifest.py), read back as a worker would.
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "tokenizer", "train",
                                                      "validation"]
    assert PreparedData.open(str(entry)) == prepared
    assert prepared.manifest.train == (Shard("train/00000.npy", prepared.train_tokens),)
    assert prepared.manifest.validation == (Shard("validation/00000.npy", prepared.val_tokens),)
    assert prepared.manifest.dtype == "uint16"
    assert np.load(entry / "train/00000.npy").dtype == np.uint16


def test_a_large_split_is_written_as_several_shards(tmp_path, two_docs, monkeypatch):
    d, a, b = two_docs
    monkeypatch.setattr(packing, "SHARD_TOKENS", 100)
    prepared = prepare_data(cfg(tmp_path, path=str(d)), CHAR, 16)
    train = prepared.manifest.train
    assert len(train) == -(-prepared.train_tokens // 100) > 1
    assert [s.file for s in train[:2]] == ["train/00000.npy", "train/00001.npy"]
    assert all(s.tokens == 100 for s in train[:-1])
    assert prepared.tokenizer().decode(whole_stream(prepared)) == a + EOS + b + EOS


def test_bpe_prepare_data_records_vocab(tmp_path, two_docs):
    d, a, b = two_docs
    prepared = prepare_data(cfg(tmp_path, path=str(d)),
                            TokenizerConfig(kind="bpe", vocab_size=300), 16)
    tok = prepared.tokenizer()
    assert prepared.vocab_size == len(tok) <= 300
    assert tok.decode(whole_stream(prepared)) == a + EOS + b + EOS


def test_second_prepare_reuses_the_cache(tmp_path, two_docs, monkeypatch):
    d, _, _ = two_docs
    data = cfg(tmp_path, path=str(d))
    first = prepare_data(data, CHAR, 16)
    mtime = (tmp_path / "cache" / first.fingerprint / "manifest.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("prepare_data rebuilt a cached entry")

    monkeypatch.setattr(packing, "_build", no_rebuild)
    second = prepare_data(data, CHAR, 16)
    assert second == first
    assert (tmp_path / "cache" / first.fingerprint / "manifest.json").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]


@pytest.mark.parametrize("damage", ["manifest.json", "train/00000.npy", "tokenizer", "empty",
                                    "old-layout"])
def test_an_incomplete_cache_entry_is_moved_aside_and_rebuilt(tmp_path, two_docs, damage):
    d, _, _ = two_docs
    data = cfg(tmp_path, path=str(d))
    first = prepare_data(data, CHAR, 16)
    entry = Path(first.entry)
    stream = whole_stream(first)
    if damage == "empty":
        shutil.rmtree(entry)
        entry.mkdir()
    elif damage == "tokenizer":
        shutil.rmtree(entry / damage)
    elif damage == "old-layout":  # an entry of the previous layout (meta.json, train.npy)
        shutil.rmtree(entry)
        entry.mkdir()
        (entry / "meta.json").write_text("{}")
        np.save(entry / "train.npy", stream)
    else:
        (entry / damage).unlink()
    second = prepare_data(data, CHAR, 16)
    assert second == first and (entry / "manifest.json").exists()
    assert np.array_equal(whole_stream(second), stream)
    (aside,) = [p for p in entry.parent.iterdir() if p.name != first.fingerprint]
    assert aside.name.startswith(f".{first.fingerprint}-incomplete-")


def test_fingerprint_changes_with_text_and_settings(tmp_path, two_docs):
    d, a, _ = two_docs
    data = cfg(tmp_path, path=str(d))
    base = prepare_data(data, CHAR, 16).fingerprint
    bpe_fp = prepare_data(data, TokenizerConfig(kind="bpe", vocab_size=300), 16).fingerprint
    bpe_other = prepare_data(data, TokenizerConfig(kind="bpe", vocab_size=280), 16).fingerprint
    split_fp = prepare_data(cfg(tmp_path, path=str(d), val_fraction=0.2), CHAR, 16).fingerprint
    (d / "a.txt").write_text(a + "one more sentence.\n")
    text_fp = prepare_data(data, CHAR, 16).fingerprint
    assert len({base, bpe_fp, bpe_other, split_fp, text_fp}) == 5


def test_jsonl_corpus_with_custom_text_field(tmp_path, write_jsonl, make_text):
    docs = [make_text(i, paragraphs=2) for i in range(3)]
    path = write_jsonl([{"id": i, "body": t} for i, t in enumerate(docs)])
    prepared = prepare_data(cfg(tmp_path, path=str(path), text_field="body"), CHAR, 16)
    assert prepared.tokenizer().decode(whole_stream(prepared)) == "".join(t + EOS for t in docs)


def test_wrong_text_field_is_named(tmp_path, write_jsonl, make_text):
    path = write_jsonl([{"body": make_text(0)}])
    with pytest.raises(ValueError, match="data.text_field") as info:
        prepare_data(cfg(tmp_path, path=str(path), text_field="text"), CHAR, 16)
    assert "body" in str(info.value)  # the columns that do exist are listed


def test_corpus_smaller_than_a_block_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("only a few characters here\n" * 3)
    with pytest.raises(ValueError, match="model.block_size"):
        prepare_data(cfg(tmp_path, path=str(tmp_path / "tiny.txt")), CHAR, 64)


def test_mixed_file_kinds_are_refused(tmp_path, write_jsonl):
    (tmp_path / "a.txt").write_text("text\n")
    write_jsonl([{"text": "json"}], name="b.jsonl")
    with pytest.raises(ValueError, match="data.path"):
        prepare_data(cfg(tmp_path, path=str(tmp_path)), CHAR, 8)


