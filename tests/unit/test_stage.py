"""The data stage without Ray: listing and fingerprint, the document split, one block of
work (shards, part marker, reuse), and the manifest written last.

`run_stage` takes its block runner as an argument; here `stage.local_blocks` stands in for Ray
Data by packing each file as one block in this process (tests/integration runs the real
one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import stage
from lmforge.data.manifest import MANIFEST, Manifest
from lmforge.data.stage import prepare_data
from lmforge.data.tokenizer import EOS

CHAR = TokenizerConfig(kind="char")


def cfg(tmp_path: Path, **data) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), **data)


@pytest.fixture
def docs_dir(tmp_path: Path, make_text) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.txt").write_text(make_text(i, paragraphs=8))
    return d


def load_split(result: stage.StageResult, split: str) -> np.ndarray:
    shards = result.manifest.shards(split)
    return np.concatenate([np.load(os.path.join(result.entry, s.file)) for s in shards])


# --- fingerprint -----------------------------------------------------------------------


def fp(data: DataConfig, tok: TokenizerConfig = CHAR) -> str:
    return stage.fingerprint(stage.list_corpus(data), data, tok)


def test_fingerprint_is_stable_and_follows_files_and_settings(tmp_path, docs_dir):
    base = cfg(tmp_path, path=str(docs_dir))
    assert fp(base) == fp(base)
    variants = {
        fp(base),
        fp(base, TokenizerConfig(kind="bpe", vocab_size=300)),
        fp(base, TokenizerConfig(kind="bpe", vocab_size=300, train_sample_bytes=1000)),
        fp(cfg(tmp_path, path=str(docs_dir), val_fraction=0.2)),
        fp(cfg(tmp_path, path=str(docs_dir), sample_by="paragraph")),
        fp(cfg(tmp_path, path=str(docs_dir), shard_tokens=4096)),
        fp(cfg(tmp_path, path=str(docs_dir), fingerprint="content")),
    }
    (docs_dir / "6.txt").write_text("one more file\n")
    variants.add(fp(base))
    assert len(variants) == 8
    # Where the entry is written is not what it holds.
    assert fp(base) == fp(DataConfig(path=str(docs_dir), cache_dir=str(tmp_path / "other")))


def test_listing_fingerprint_reads_no_text_and_content_does(tmp_path, docs_dir):
    listing = cfg(tmp_path, path=str(docs_dir))
    content = cfg(tmp_path, path=str(docs_dir), fingerprint="content")
    before = fp(listing), fp(content)
    # Same size and mtime, other bytes: only content hashing can tell.
    f = docs_dir / "0.txt"
    st = f.stat()
    text = f.read_text()
    f.write_text(text[::-1])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp(listing) == before[0]
    assert fp(content) != before[1]
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fp(listing) != before[0]  # a touched file is a new entry


def test_listing_is_a_file_a_directory_or_a_glob(tmp_path, docs_dir):
    (docs_dir / "notes.bin").write_bytes(b"\x00")  # not a corpus suffix: skipped
    assert len(stage.list_corpus(cfg(tmp_path, path=str(docs_dir))).files) == 6
    assert len(stage.list_corpus(cfg(tmp_path, path=str(docs_dir / "1.txt"))).files) == 1
    assert len(stage.list_corpus(cfg(tmp_path, path=str(docs_dir / "[12].txt"))).files) == 2
    with pytest.raises(ValueError, match="data.path"):
        stage.list_corpus(cfg(tmp_path, path=str(tmp_path / "missing")))


def test_mixed_file_kinds_are_refused(tmp_path, write_jsonl):
    (tmp_path / "a.txt").write_text("text\n")
    write_jsonl([{"text": "json"}], name="b.jsonl")
    with pytest.raises(ValueError, match="data.path: mixes"):
        stage.list_corpus(cfg(tmp_path, path=str(tmp_path)))


# --- the document split ----------------------------------------------------------------


def test_validation_is_a_stable_hash_of_each_document():
    docs = [f"document {i}: " + "words " * (i % 7) for i in range(20_000)]
    held = [stage.is_validation(stage.digest(d), 0.1) for d in docs]
    assert held == [stage.is_validation(stage.digest(d), 0.1) for d in docs]
    assert 0.09 < sum(held) / len(docs) < 0.11
    # Raising the fraction only adds documents to validation.
    wider = [stage.is_validation(stage.digest(d), 0.2) for d in docs]
    assert all(w for h, w in zip(held, wider, strict=True) if h)
    assert sum(wider) > sum(held)


def test_a_long_document_gives_its_tail_to_validation():
    doc = "".join(f"line {i} of a long document\n" for i in range(10_000))
    assert len(doc) > stage.LONG_DOC_CHARS
    (head, h), (tail, t) = stage.split_document(doc, 0.1)
    assert (h, t) == (False, True) and head + tail == doc
    assert head.endswith("\n") and abs(len(tail) / len(doc) - 0.1) < 0.01
    short = "a short document\n"
    assert stage.split_document(short, 0.1) == [
        (short, stage.is_validation(stage.digest(short), 0.1))]


def test_segments_cut_after_newlines_and_rejoin():
    text = "".join(f"{i:05d} " * 20 + "\n" for i in range(2000))
    parts = stage.segments(text, 4096)
    assert "".join(parts) == text and len(parts) > 10
    assert all(p.endswith("\n") and len(p) >= 4096 for p in parts[:-1])
    assert stage.segments("no newline " * 1000, 100) == ["no newline " * 1000]


@pytest.mark.parametrize("sample_by,expected", [
    ("document", ["a\nb\n\nc\n"]), ("paragraph", ["a\nb", "c\n"]), ("line", ["a", "b", "c"])])
def test_documents_per_sample_by(sample_by, expected):
    assert stage.documents("a\nb\n\nc\n", sample_by) == expected


# --- the stage: entry, shards, manifest --------------------------------------------------


def test_the_entry_holds_every_document_once_with_eos(tmp_path, docs_dir):
    result = stage.run_stage(cfg(tmp_path, path=str(docs_dir)), CHAR, run_blocks=stage.local_blocks)
    tok = stage_tokenizer(result)
    train, val = load_split(result, "train"), load_split(result, "validation")
    docs = sorted((docs_dir / f"{i}.txt").read_text() for i in range(6))
    decoded = [d for d in (tok.decode(train) + tok.decode(val)).split(EOS) if d]
    assert sorted(decoded) == docs  # each document whole, in exactly one split
    held = [d for d in docs if stage.is_validation(stage.digest(d), 0.1)]
    assert sorted(d for d in tok.decode(val).split(EOS) if d) == sorted(held)
    assert result.manifest.eos_id == tok.eos_token_id
    assert result.manifest.vocab_size == len(tok)
    assert train.dtype == np.uint16 and result.manifest.dtype == "uint16"
    summary = result.summary()
    assert summary["tokens"] == len(train) + len(val) and summary["cached"] is False
    assert summary["shards"] == len(result.manifest.train) + len(result.manifest.validation)


def stage_tokenizer(result: stage.StageResult):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(result.entry, "tokenizer"))


def test_shards_are_fixed_size_but_the_last_of_a_block(tmp_path, make_text):
    (tmp_path / "big.txt").write_text(make_text(0, paragraphs=200))
    data = cfg(tmp_path, path=str(tmp_path / "big.txt"), shard_tokens=4096, val_fraction=0.2)
    result = stage.run_stage(data, CHAR, run_blocks=stage.local_blocks)
    sizes = [s.tokens for s in result.manifest.train]
    assert len(sizes) > 3 and set(sizes[:-1]) == {4096} and 0 < sizes[-1] <= 4096
    assert [np.load(os.path.join(result.entry, s.file)).size for s in result.manifest.train] \
        == sizes


def test_manifest_is_written_last_and_a_killed_stage_leaves_none(tmp_path, docs_dir,
                                                                   monkeypatch):
    data = cfg(tmp_path, path=str(docs_dir))
    writes: list[str] = []
    real_put = stage.put_bytes

    def killed_at_the_fourth_block(fs, path, payload):
        if path.endswith(".json") and "/parts/" in path and len(
                [w for w in writes if "/parts/" in w]) == 3:
            raise KeyboardInterrupt  # the stage dies here, as under SIGKILL
        writes.append(path)
        real_put(fs, path, payload)

    monkeypatch.setattr(stage, "put_bytes", killed_at_the_fourth_block)
    with pytest.raises(KeyboardInterrupt):
        stage.run_stage(data, CHAR, run_blocks=stage.local_blocks)
    entry = tmp_path / "cache" / fp(data)
    assert not (entry / MANIFEST).exists()
    assert len(list((entry / "parts").iterdir())) == 3

    # The rerun reuses the three finished blocks (no tokenizing them), packs the rest, and
    # writes the manifest after everything else.
    writes.clear()
    monkeypatch.setattr(stage, "put_bytes", lambda fs, path, payload: (
        writes.append(path), real_put(fs, path, payload)))
    real_manifest = stage.write_manifest
    monkeypatch.setattr(stage, "write_manifest", lambda entry, manifest: (
        writes.append(f"{entry}/{MANIFEST}"), real_manifest(entry, manifest)))
    result = stage.run_stage(data, CHAR, run_blocks=stage.local_blocks)
    assert result.reused_blocks == 3 and result.blocks == 6
    assert writes[-1].endswith(MANIFEST) and sum(w.endswith(MANIFEST) for w in writes) == 1
    assert not any("/tokenizer/" in w for w in writes)  # the killed run's tokenizer is kept
    manifest = Manifest.from_json((entry / MANIFEST).read_text())
    assert all((entry / s.file).is_file() for s in manifest.train + manifest.validation)
    assert len(load_split(result, "train")) == manifest.tokens("train")
    clean = stage.run_stage(cfg(tmp_path / "clean", path=str(docs_dir)), CHAR,
                            run_blocks=stage.local_blocks)
    assert clean.manifest.train == manifest.train  # same shards as a run never killed


def test_second_run_is_cached_without_building(tmp_path, docs_dir):
    data = cfg(tmp_path, path=str(docs_dir))
    first = stage.run_stage(data, CHAR, run_blocks=stage.local_blocks)

    def no_build(*args):
        raise AssertionError("a cached entry was built again")

    second = stage.run_stage(data, CHAR, run_blocks=no_build)
    assert second.cached and second.manifest == first.manifest
    assert second.summary()["tokens_per_s"] is None


def test_a_missing_shard_is_rebuilt_not_trusted(tmp_path, docs_dir):
    data = cfg(tmp_path, path=str(docs_dir))
    first = stage.run_stage(data, CHAR, run_blocks=stage.local_blocks)
    lost = first.manifest.train[2]
    os.remove(os.path.join(first.entry, lost.file))
    again = stage.run_stage(data, CHAR, run_blocks=stage.local_blocks)
    assert not again.cached and again.reused_blocks == 5  # only the damaged block redone
    assert again.manifest == first.manifest
    assert os.path.isfile(os.path.join(first.entry, lost.file))


def test_bpe_is_trained_on_a_bounded_sample(tmp_path, docs_dir, monkeypatch):
    seen: list[int] = []
    real = stage.sample_texts

    def spy(source, data, budget):
        texts = real(source, data, budget)
        seen.append(sum(len(t.encode()) for t in texts))
        return texts

    monkeypatch.setattr(stage, "sample_texts", spy)
    tok = TokenizerConfig(kind="bpe", vocab_size=300, train_sample_bytes=3000)
    result = stage.run_stage(cfg(tmp_path, path=str(docs_dir)), tok, run_blocks=stage.local_blocks)
    assert seen and seen[0] <= 3000
    assert 256 < result.manifest.vocab_size <= 300
    text = (docs_dir / "3.txt").read_text()  # mostly outside the sample, still round-trips
    assert stage_tokenizer(result).decode(stage_tokenizer(result).encode(text)) == text


def test_jsonl_text_field_is_checked_and_named(tmp_path, write_jsonl, make_text):
    path = write_jsonl([{"body": make_text(0)}])
    with pytest.raises(ValueError, match="data.text_field") as info:
        stage.run_stage(cfg(tmp_path, path=str(path)), CHAR, run_blocks=stage.local_blocks)
    assert "body" in str(info.value)


# --- prepare_data: what training gets ----------------------------------------------------


def test_prepared_data_describes_its_entry(tmp_path, docs_dir):
    prepared = prepare_data(cfg(tmp_path, path=str(docs_dir)), CHAR, 16,
                            run_blocks=stage.local_blocks)
    assert prepared.entry == str(tmp_path / "cache" / prepared.fingerprint)
    assert prepared.vocab_size == len(prepared.tokenizer())
    assert prepared.eos_id == prepared.tokenizer().eos_token_id
    assert prepared.train_tokens + prepared.val_tokens == sum(
        np.load(prepared.local_path(s.file)).size
        for s in prepared.manifest.train + prepared.manifest.validation)


def test_sample_by_line_makes_one_document_per_line(tmp_path):
    text = "".join(f"line number {i}, with some words\n" for i in range(60))
    (tmp_path / "lines.txt").write_text(text)
    prepared = prepare_data(cfg(tmp_path, path=str(tmp_path / "lines.txt"), sample_by="line",
                                val_fraction=0.3), CHAR, 8, run_blocks=stage.local_blocks)
    eos = sum(int((np.load(prepared.local_path(s.file)) == prepared.eos_id).sum())
              for s in prepared.manifest.train + prepared.manifest.validation)
    assert eos == 60


def test_jsonl_corpus_with_custom_text_field(tmp_path, write_jsonl, make_text):
    docs = [make_text(i, paragraphs=2) for i in range(12)]
    path = write_jsonl([{"id": i, "body": t} for i, t in enumerate(docs)])
    prepared = prepare_data(cfg(tmp_path, path=str(path), text_field="body", val_fraction=0.3),
                            CHAR, 16, run_blocks=stage.local_blocks)
    tok = prepared.tokenizer()
    got = [d for split in ("train", "validation") for s in prepared.manifest.shards(split)
           for d in tok.decode(np.load(prepared.local_path(s.file))).split(EOS) if d]
    assert sorted(got) == sorted(docs)


def test_corpus_smaller_than_a_block_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text("only a few characters here\n" * 3)
    with pytest.raises(ValueError, match="model.block_size"):
        prepare_data(cfg(tmp_path, path=str(tmp_path / "tiny.txt")), CHAR, 64,
                     run_blocks=stage.local_blocks)


def test_the_sample_stops_at_its_budget_on_whole_json_lines(tmp_path, write_jsonl):
    rows = [{"text": f"document {i} " + "x" * 500} for i in range(40)]
    write_jsonl(rows[:20], name="a.jsonl")
    write_jsonl(rows[20:], name="b.jsonl")
    data = cfg(tmp_path, path=str(tmp_path / "*.jsonl"))
    source = stage.list_corpus(data)
    for budget in (100, 1500, 6000, 10**6):  # under one line, a few lines, all of them
        texts = stage.sample_texts(source, data, budget)
        assert sum(len(t.encode()) for t in texts) <= budget
        assert all(t in [r["text"] for r in rows] for t in texts)
    assert len(stage.sample_texts(source, data, 10**6)) == 40
