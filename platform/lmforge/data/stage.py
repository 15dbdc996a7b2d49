"""The data stage on Ray Data: a corpus becomes a cache entry of token shards and a manifest.

    list the corpus (no text read) ─► fingerprint ─► entry has manifest.json? ─► done
        │ no
        ▼
    tokenizer: reuse the entry's, or train on a bounded sample and write it
        ▼
    Ray Data reader (read_binary_files / read_json / read_parquet / from_huggingface)
        ─► map_batches(pack_block) on every CPU of the cluster: one call per block of
           input; it cuts documents, splits them by hash, tokenizes in small batches and
           writes fixed-size shards, then a part marker listing them
        ▼
    the driver writes manifest.json from the part markers, last, in one put

Why it holds up:
- Memory is bounded by one block of input (`data.block_bytes`, 32 MB by default) plus one shard
  buffer per split, in every Ray worker; the driver only holds the tokenizer sample and a
  small JSON row per block. Nothing ever holds the corpus or its token stream.
- A block's shards are named by a hash of its content (and the tokenizer), and its part
  marker is written after its shards. A killed stage leaves at worst orphan shards that no
  manifest names; a rerun finds the markers of finished blocks and skips their work.
- Validation is held out by document: a document goes to validation when a stable hash of
  its text (blake2b) falls under `data.val_fraction`, on any machine and any run. A
  document over LONG_DOC_CHARS instead gives its tail to validation.

Entry layout: see `lmforge.data.manifest`. Shard files are named
`<split>/<block key>-<nnnn>.npy`; readers only ever go through the manifest.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import math
import os
import posixpath
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from lmforge import storage
from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data import chat
from lmforge.data.manifest import (
    VERSION,
    Manifest,
    PreparedData,
    Shard,
    join,
    read_manifest,
    write_manifest,
)

Kind = Literal["text", "json", "parquet", "hub", "pydoc"]
_KINDS: dict[str, Kind] = {".txt": "text", ".text": "text", ".md": "text", ".json": "json",
                           ".jsonl": "json", ".parquet": "parquet"}

LONG_DOC_CHARS = 100_000
"""A document longer than this (a book; a one-file corpus such as tinyshakespeare) is not
held out whole: its last `val_fraction`, cut at a line end, is validation. Whole-document
hashing would put such a corpus entirely in one split."""
ENCODE_CHARS = 2**20
"""Characters per tokenizer call: bounds the Python token lists one call returns."""
PIECE_CHARS = 2**16
"""Long texts are tokenized in pieces of about this size, cut after a newline."""


# --- the corpus: what is read, and its fingerprint -------------------------------------


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Path inside the source's filesystem (absolute for local files, bucket/key for s3)."""
    size: int
    mtime_ns: int


@dataclass
class Source:
    """The corpus the spec names: its kind, its filesystem and its file listing (or the
    hub dataset, or Python's docs)."""

    kind: Kind
    files: tuple[SourceFile, ...] = ()
    fs: pafs.FileSystem | None = None
    hub: Any = None
    """The loaded `datasets.Dataset` for `data.hub_id`."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> dict[str, Any]:
        """What goes into the manifest's `source`: the listing, or the hub dataset."""
        if self.kind == "hub":
            return {"kind": "hub", "fingerprint": getattr(self.hub, "_fingerprint", None)}
        return {"kind": self.kind, "files": [[f.path, f.size, f.mtime_ns] for f in self.files]}


def list_corpus(data: DataConfig) -> Source:
    """The spec's corpus, listed without reading any text."""
    if data.path is not None:
        fs, files = _list_files(data.path)
        if not files:
            raise ValueError(f"data.path: no corpus file found at {data.path!r}")
        kinds = {_KINDS.get(posixpath.splitext(f.path)[1], "text") for f in files}
        if len(kinds) != 1:
            raise ValueError(f"data.path: mixes file kinds {sorted(kinds)}; use one kind per "
                             "corpus")
        kind = kinds.pop()
        if data.format != "text" and kind not in ("json", "parquet"):
            raise ValueError(f"data.path: data.format {data.format!r} reads .jsonl/.json/"
                             f".parquet records, not {kind} files")
        return Source(kind, tuple(files), fs)
    if data.hub_id is not None:
        import datasets

        ds = datasets.load_dataset(data.hub_id, split=data.hub_split)
        if data.text_field not in ds.column_names:
            raise ValueError(f"data.text_field: column {data.text_field!r} not in the corpus "
                             f"(columns: {ds.column_names})")
        return Source("hub", hub=ds.select_columns([data.text_field]))
    return Source("pydoc")


def _list_files(path: str) -> tuple[pafs.FileSystem, list[SourceFile]]:
    """A file, the supported files under a directory, or a glob; local or object store."""
    fs, inner = storage.filesystem(path, "data.path")
    if any(c in inner for c in "*?["):
        if isinstance(fs, pafs.LocalFileSystem):
            names = sorted(glob.glob(os.path.expanduser(path), recursive=True))
            infos = [i for i in fs.get_file_info([os.path.abspath(n) for n in names])
                     if i.type == pafs.FileType.File]
        else:  # object stores have no glob: list below the pattern's fixed prefix
            base = inner[:min(inner.find(c) for c in "*?[" if c in inner)].rpartition("/")[0]
            infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                     if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, inner)]
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.Directory:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                     if i.type == pafs.FileType.File
                     and posixpath.splitext(i.path)[1] in _KINDS]
        else:
            infos = []
    files = [SourceFile(i.path, i.size or 0, i.mtime_ns or 0) for i in infos]
    return fs, sorted(files, key=lambda f: f.path)


def settings(data: DataConfig, tok: TokenizerConfig, block_size: int | None = None
             ) -> dict[str, Any]:
    """Every setting that changes what the entry holds (not where it is written). A `text`
    entry's settings are what they were before the fine-tuning formats (same fingerprints);
    an `instruction`/`chat` entry adds its format, block size and template."""
    out = {"text_field": data.text_field, "sample_by": data.sample_by,
           "val_fraction": data.val_fraction, "shard_tokens": data.shard_tokens,
           "block_bytes": data.block_bytes, "long_doc_chars": LONG_DOC_CHARS,
           "tokenizer": tok.model_dump(mode="json")}
    if data.format != "text":
        if block_size is None:
            raise ValueError(f"data.format {data.format!r}: the entry is cut for one "
                             "model.block_size, and none was given")
        out |= {"format": data.format, "block_size": block_size, "packing": data.packing,
                "overlong": data.overlong, "chat_template": chat.load_template(
                    data.chat_template)}
    return out


def fingerprint(source: Source, data: DataConfig, tok: TokenizerConfig,
                block_size: int | None = None) -> str:
    """The entry's name: the settings plus the file listing (path, size, mtime), so a
    cached corpus costs one listing, not a read; `data.fingerprint: content` hashes every
    file's bytes instead of its mtime. Python's docs are small and always hashed."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({"version": VERSION, "kind": source.kind, "mode": data.fingerprint,
                         "settings": settings(data, tok, block_size)}, sort_keys=True
                        ).encode())
    if source.kind == "pydoc":
        for text in _pydoc_texts():
            h.update(text.encode())
            h.update(b"\x00")  # document boundary: ["ab"] and ["a", "b"] differ
    elif source.kind == "hub":
        h.update(f"{data.hub_id}\x00{data.hub_split}\x00{source.hub._fingerprint}".encode())
    for f in source.files:
        if data.fingerprint == "listing":
            h.update(f"{f.path}\x00{f.size}\x00{f.mtime_ns}\n".encode())
        else:
            h.update(f"{f.path}\x00{f.size}\n".encode())
            with source.fs.open_input_stream(f.path) as stream:
                while chunk := stream.read(8 * 2**20):
                    h.update(chunk)
    return h.hexdigest()


def _pydoc_texts() -> list[str]:
    """Python's documentation topics (~460 KB of English prose and code) as documents."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# --- documents, segments and the validation split --------------------------------------


def documents(text: str, sample_by: str) -> list[str]:
    """A .txt file's documents: the file, its blank-line paragraphs, or its lines (without
    their separators, as Hugging Face `datasets` reads them). Empty ones are dropped."""
    if sample_by == "document":
        parts = [text]
    elif sample_by == "paragraph":
        parts = text.split("\n\n")
    else:
        parts = text.split("\n")
    return [p for p in parts if p]


def segments(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` itself, or when longer than `size` its pieces of at least `size` characters
    cut after a newline (a text without newlines stays whole)."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size - 1)
        end = len(text) if cut < 0 else cut + 1
        out.append(text[start:end])
        start = end
    return out


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def is_validation(text_digest: bytes, val_fraction: float) -> bool:
    """Held out when the text's hash, read as a number in [0, 1), is under val_fraction:
    stable across runs, machines and block boundaries; duplicates fall on the same side."""
    return int.from_bytes(text_digest[:8], "big") < val_fraction * 2**64


def split_document(doc: str, val_fraction: float) -> list[tuple[str, bool]]:
    """(text, held out) parts of one document, in order: the whole document on the side its
    hash picks, or for a long one its head for training and its tail for validation."""
    if len(doc) <= LONG_DOC_CHARS:
        return [(doc, is_validation(digest(doc), val_fraction))]
    at = int(len(doc) * (1 - val_fraction))
    cut = doc.rfind("\n", 0, at) + 1 or at  # after a newline, if the head has one
    return [(doc[:cut], False), (doc[cut:], True)]


# --- one block of work, run in a Ray worker --------------------------------------------


@dataclass(frozen=True)
class PackJob:
    """What every block needs, shipped to the workers by Ray Data (plain values)."""

    entry: str
    """The entry: a local directory or an object-store URI."""
    tokenizer_json: str
    """The backend tokenizer (`tokenizers.Tokenizer.to_str()`)."""
    eos_id: int
    dtype: str
    val_fraction: float
    shard_tokens: int
    column: str
    """`bytes` for .txt files (one row per file), else the text field."""
    sample_by: str = "document"
    format: str = "text"
    """`text`, or `instruction`/`chat`: records become rows of examples (`pack_examples`)."""
    block_size: int = 0
    packing: bool = True
    overlong: str = "truncate"
    tokenizer_files: tuple[tuple[str, bytes], ...] = ()
    """`instruction`/`chat`: the saved tokenizer directory (with its chat template), which
    `apply_chat_template` needs beyond the backend tokenizer."""

    @property
    def salt(self) -> bytes:
        """Part of every block key: a block tokenized by another tokenizer is other work."""
        return hashlib.blake2b(f"{self.tokenizer_json}\x00{self.eos_id}\x00{self.dtype}"
                               .encode(), digest_size=16).digest()


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Any:
    """Parsed once per worker process, not once per block."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def _block_texts(batch: pa.Table, job: PackJob) -> list[str]:
    if job.column == "bytes":  # .txt files, one row each
        return [t for raw in batch.column("bytes").to_pylist() if raw
                for t in documents(raw.decode("utf-8", "replace"), job.sample_by)]
    return [t for t in batch.column(job.column).to_pylist() if isinstance(t, str) and t]


def pack_block(batch: pa.Table, job: PackJob) -> pa.Table:
    """One block of input -> its shards and part marker; returns one row, the part marker's
    JSON. Reused when a finished marker for the same content is already in the entry."""
    if job.format != "text":
        return pack_examples(batch, job)
    pieces: list[tuple[str, bool, bool]] = []  # (text, ends its document, held out)
    key_hash = hashlib.blake2b(job.salt, digest_size=8)
    for doc in _block_texts(batch, job):
        for text, held_out in split_document(doc, job.val_fraction):
            key_hash.update(f"{held_out:d}".encode())
            parts = segments(text)
            for piece in parts:
                key_hash.update(digest(piece))
                pieces.append((piece, False, held_out))
        pieces[-1] = (pieces[-1][0], True, pieces[-1][2])  # the document's last piece
        key_hash.update(b"\x00")
    key = key_hash.hexdigest()
    fs, root = storage.filesystem(job.entry, "data.cache_dir")
    marker = f"{root}/parts/{key}.json"
    done = _finished_part(fs, root, marker)
    if done is not None:
        return pa.table({"part": [json.dumps(done | {"reused": True})]})

    tok = _tokenizer(job.tokenizer_json)
    writers = {split: ShardWriter(fs, root, split, key, job.shard_tokens, np.dtype(job.dtype))
               for split in ("train", "validation")}
    for chunk in _chunks(pieces, ENCODE_CHARS):
        encodings = tok.encode_batch_fast([p[0] for p in chunk], add_special_tokens=False)
        ids: dict[str, list[int]] = {"train": [], "validation": []}
        for (_, last, held_out), enc in zip(chunk, encodings, strict=True):
            out = ids["validation" if held_out else "train"]
            out.extend(enc.ids)
            if last:
                out.append(job.eos_id)  # end of document
        for split, tokens in ids.items():
            if tokens:
                writers[split].add(np.array(tokens, dtype=job.dtype))
    part = {"key": key, "documents": sum(p[1] for p in pieces),
            "shards": [s for w in writers.values() for s in w.close()]}
    put_bytes(fs, marker, json.dumps(part).encode())  # after its shards: marks them whole
    return pa.table({"part": [json.dumps(part | {"reused": False})]})


@lru_cache(maxsize=2)
def _chat_tokenizer(files: tuple[tuple[str, bytes], ...]) -> Any:
    """The Hugging Face tokenizer (with its chat template) from its saved files; parsed once
    per worker process."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="lmforge-tok-") as tmp:
        for name, content in files:
            Path(tmp, name).write_bytes(content)
        return AutoTokenizer.from_pretrained(tmp)


def pack_examples(batch: pa.Table, job: PackJob) -> pa.Table:
    """`pack_block` for instruction/chat records: each record is rendered with the chat
    template, cut or dropped to block_size + 1 tokens, sent to a split by a hash of the
    record, and packed into rows (`chat.RowPacker`) written as shards of at most
    `shard_tokens` tokens' worth of rows. The part marker carries the block's `stats`."""
    records = batch.to_pylist()
    key_hash = hashlib.blake2b(job.salt + b"rows", digest_size=8)
    encoded = []
    for record in records:
        path = record.pop("path", None)  # added by the reader (include_paths)
        text = json.dumps(record, sort_keys=True, default=str)
        held_out = is_validation(digest(text), job.val_fraction)
        key_hash.update(f"{held_out:d}".encode() + digest(text))
        encoded.append((record, path, held_out))
    key = key_hash.hexdigest()
    fs, root = storage.filesystem(job.entry, "data.cache_dir")
    marker = f"{root}/parts/{key}.json"
    done = _finished_part(fs, root, marker)
    if done is not None:
        return pa.table({"part": [json.dumps(done | {"reused": True})]})

    tok = _chat_tokenizer(job.tokenizer_files)
    length = job.block_size + 1
    stats = chat.Stats()
    packers = {split: chat.RowPacker(length, job.packing, job.eos_id)
               for split in ("train", "validation")}
    writers = {split: RowWriter(fs, root, split, key, max(1, job.shard_tokens // length))
               for split in ("train", "validation")}
    for record, path, held_out in encoded:
        try:
            messages = chat.to_messages(record, job.format)
        except chat.RecordError as e:
            where = path or "a record"
            raise ValueError(f"data.path: {where}: {e} (data.format {job.format!r}; record: "
                             f"{json.dumps(record, default=str)[:200]})") from None
        example = chat.fit(*chat.render(tok, messages), length, job.overlong, stats)
        if example is None:
            continue
        split = "validation" if held_out else "train"
        packers[split].add(*example)
        for row, tokens in packers[split].rows():
            writers[split].add(row, tokens)
    for split, packer in packers.items():
        for row, tokens in packer.rows(final=True):
            writers[split].add(row, tokens)
    part = {"key": key, "documents": len(records), "stats": vars(stats),
            "shards": [s for w in writers.values() for s in w.close()]}
    put_bytes(fs, marker, json.dumps(part).encode())  # after its shards: marks them whole
    return pa.table({"part": [json.dumps(part | {"reused": False})]})


def _chunks(pieces: list[tuple[str, bool, bool]], chars: int) -> Iterator[list]:
    chunk: list = []
    size = 0
    for p in pieces:
        chunk.append(p)
        size += len(p[0])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _finished_part(fs: pafs.FileSystem, root: str, marker: str) -> dict[str, Any] | None:
    """A part marker whose shards all exist, or None (then the block is packed again)."""
    if fs.get_file_info(marker).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(marker) as f:
        part = json.loads(f.read().decode())
    files = fs.get_file_info([f"{root}/{s['file']}" for s in part["shards"]])
    if any(i.type != pafs.FileType.File for i in files):
        return None
    return part


class ShardWriter:
    """Fills a buffer of `shard_tokens` and writes it as `<split>/<key>-<nnnn>.npy` each
    time it is full; `close` writes what is left. Memory: one buffer."""

    def __init__(self, fs: pafs.FileSystem, root: str, split: str, key: str,
                 shard_tokens: int, dtype: np.dtype) -> None:
        self.fs, self.root, self.split, self.key = fs, root, split, key
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.written: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buf):
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self.fill:
            self._flush()
        return self.written

    def _flush(self) -> None:
        name = put_shard(self.fs, self.root, self.split, self.key, len(self.written),
                         self.buf[:self.fill])
        self.written.append({"split": self.split, "file": name, "tokens": int(self.fill)})
        self.fill = 0


class RowWriter:
    """`ShardWriter` for rows of examples: `rows_per_shard` rows (3, block_size + 1) per
    int32 shard `<split>/<key>-<nnnn>.npy`."""

    def __init__(self, fs: pafs.FileSystem, root: str, split: str, key: str,
                 rows_per_shard: int) -> None:
        self.fs, self.root, self.split, self.key = fs, root, split, key
        self.rows_per_shard = rows_per_shard
        self.buf: list[np.ndarray] = []
        self.tokens = 0  # the examples' tokens in `buf`, padding excluded
        self.written: list[dict[str, Any]] = []

    def add(self, row: np.ndarray, tokens: int) -> None:
        self.buf.append(row)
        self.tokens += tokens
        if len(self.buf) == self.rows_per_shard:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self.buf:
            self._flush()
        return self.written

    def _flush(self) -> None:
        rows = np.stack(self.buf)
        name = put_shard(self.fs, self.root, self.split, self.key, len(self.written), rows)
        self.written.append({"split": self.split, "file": name, "tokens": self.tokens,
                             "rows": len(rows)})
        self.buf, self.tokens = [], 0


def put_shard(fs: pafs.FileSystem, root: str, split: str, key: str, index: int,
              array: np.ndarray) -> str:
    """Write `array` as the shard `<split>/<key>-<index>.npy` under `root` (whole or not at
    all) and return that name, as the manifest lists it."""
    name = f"{split}/{key}-{index:04d}.npy"
    out = io.BytesIO()
    np.save(out, array)
    put_bytes(fs, f"{root}/{name}", out.getbuffer())
    return name


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes | memoryview) -> None:
    """Write a file whole or not at all: on a local disk through a temporary name and a
    rename; an object store publishes an object only when its upload completes."""
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


# --- the driver -------------------------------------------------------------------------


@dataclass(frozen=True)
class StageResult:
    fingerprint: str
    entry: str
    """The entry: a local directory or an object-store URI."""
    manifest: Manifest
    cached: bool
    wall_s: float
    reused_blocks: int = 0
    blocks: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """`lmforge data`'s summary JSON."""
        tokens = self.manifest.tokens("train") + self.manifest.tokens("validation")
        return {
            "fingerprint": self.fingerprint, "entry": self.entry,
            "shards": len(self.manifest.train) + len(self.manifest.validation),
            "tokens": tokens, "train_tokens": self.manifest.tokens("train"),
            "val_tokens": self.manifest.tokens("validation"),
            "tokens_per_s": None if self.cached else round(tokens / max(self.wall_s, 1e-9)),
            "wall_s": round(self.wall_s, 2), "cached": self.cached,
            "blocks": self.blocks, "reused_blocks": self.reused_blocks,
            **{f"{k}_s": round(v, 2) for k, v in self.timings.items()},
            **({"format": self.manifest.format, "block_size": self.manifest.block_size,
                "train_rows": sum(s.rows for s in self.manifest.train),
                "val_rows": sum(s.rows for s in self.manifest.validation),
                **self.manifest.stats} if self.manifest.rows else {}),
        }


def whole_entry(entry: str) -> Manifest | None:
    """The entry's manifest when it is there and every file it names exists; else None
    (never finished, files deleted since, or another layout version: the stage then
    finishes or repairs the entry, reusing every block that is still whole)."""
    try:
        manifest = read_manifest(entry)
    except (ValueError, TypeError, KeyError):
        return None
    if manifest is None:
        return None
    fs, root = storage.filesystem(entry, "data.cache_dir")
    names = [f"{root}/{s.file}" for s in manifest.train + manifest.validation]
    names.append(f"{root}/tokenizer/tokenizer.json")
    if any(i.type != pafs.FileType.File for i in fs.get_file_info(names)):
        return None
    return manifest


BlockRunner = Callable[["Source", DataConfig, "PackJob"], list[dict[str, Any]]]


def run_stage(data: DataConfig, tok_cfg: TokenizerConfig,
              log: Callable[[str], None] | None = None,
              run_blocks: BlockRunner | None = None,
              block_size: int | None = None) -> StageResult:
    """Reuse the cache entry for this corpus and these settings, or build it on Ray Data
    (`run_blocks`, default `ray_blocks`; the unit tests pass one that runs in-process).
    `block_size` (`model.block_size`) is needed by the `instruction` and `chat` formats,
    whose entries hold rows of whole examples cut for it; `text` ignores it."""
    log = log or (lambda msg: print(f"[lmforge] data: {msg}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    source = list_corpus(data)
    if data.format == "text":
        block_size = None  # one text entry serves every block size
    fp = fingerprint(source, data, tok_cfg, block_size)
    entry = join(data.cache_dir, fp)
    fs, root = storage.filesystem(entry, "data.cache_dir")
    manifest = whole_entry(entry)
    if manifest is not None:
        return StageResult(fp, entry, manifest, cached=True,
                           wall_s=time.perf_counter() - start)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenizer = _entry_tokenizer(fs, root, source, data, tok_cfg, log)
    timings["tokenizer"] = time.perf_counter() - t0
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "uint32"
    rows = data.format != "text"
    if rows:
        dtype = "int32"  # rows: token ids, position ids and the loss mask in one array
    job = PackJob(entry=entry, tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                  eos_id=tokenizer.eos_token_id, dtype=dtype, val_fraction=data.val_fraction,
                  shard_tokens=data.shard_tokens,
                  column="bytes" if source.kind == "text" else
                  ("text" if source.kind == "pydoc" else data.text_field),
                  sample_by=data.sample_by, format=data.format, block_size=block_size or 0,
                  packing=data.packing, overlong=data.overlong,
                  tokenizer_files=_tokenizer_files(fs, root) if rows else ())
    t0 = time.perf_counter()
    parts = (run_blocks or ray_blocks)(source, data, job)
    timings["pack"] = time.perf_counter() - t0

    shards: dict[str, list[Shard]] = {"train": [], "validation": []}
    stats = chat.Stats()
    for part in parts:
        for s in part["shards"]:
            shards[s["split"]].append(Shard(file=s["file"], tokens=s["tokens"],
                                            rows=s.get("rows", 0)))
        stats.add(part.get("stats", {}))
    manifest = Manifest(
        fingerprint=fp, dtype=dtype, vocab_size=len(tokenizer),
        eos_id=tokenizer.eos_token_id,
        train=tuple(sorted(shards["train"], key=lambda s: s.file)),
        validation=tuple(sorted(shards["validation"], key=lambda s: s.file)),
        settings=settings(data, tok_cfg, block_size), source=source.describe(),
        format=data.format, block_size=block_size, stats=vars(stats) if rows else {})
    write_manifest(entry, manifest)  # last, in one put: now the entry is whole
    reused = sum(p["reused"] for p in parts)
    wall = time.perf_counter() - start
    log(f"{fp}: {len(parts)} blocks ({reused} reused), "
        f"{manifest.tokens('train') + manifest.tokens('validation'):,} tokens in {wall:.1f} s"
        + (f"; {stats.examples:,} examples, {stats.truncated:,} truncated, "
           f"{stats.dropped:,} dropped" if rows else ""))
    return StageResult(fp, entry, manifest, cached=False, wall_s=wall,
                       reused_blocks=reused, blocks=len(parts), timings=timings)


def prepare_data(data: DataConfig, tok_cfg: TokenizerConfig, block_size: int,
                 run_blocks: BlockRunner | None = None) -> PreparedData:
    """The data stage for a training run: the entry (built or reused) as training finds
    it, refused at once when a split cannot fill one block of `block_size` + 1 tokens."""
    result = run_stage(data, tok_cfg, run_blocks=run_blocks, block_size=block_size)
    prepared = PreparedData(result.fingerprint, result.entry, result.manifest)
    for split, n in (("train", prepared.train_tokens), ("validation", prepared.val_tokens)):
        if result.manifest.block_offsets(split, block_size)[-1] == 0:
            hint = ("no document was held out; raise data.val_fraction or use more, "
                    "shorter documents (data.sample_by)" if n == 0 else
                    "use a larger corpus or a smaller block_size")
            raise ValueError(f"model.block_size: the {split} split has {n} tokens, not one "
                             f"block of {block_size + 1} in any shard; {hint}")
    return prepared


def ray_blocks(source: Source, data: DataConfig, job: PackJob) -> list[dict[str, Any]]:
    """Read the corpus with Ray Data's reader for its kind and pack every block across the
    cluster; returns the part markers (small rows) as they finish."""
    import ray.data

    from lmforge.cluster import init_ray

    init_ray()
    # Ray Data's workers write the shards: on several hosts, not to a local directory.
    storage.require_shared(storage.resolve(data.cache_dir, "data.cache_dir"))
    # The number of blocks follows the listing, not the cluster: the same corpus cuts into
    # the same blocks (so the same block keys) on a laptop and on a cluster, and a rerun
    # reuses what finished.
    paths = [f.path for f in source.files]
    blocks = min(len(paths), max(1, math.ceil(source.total_bytes / data.block_bytes)))
    records = data.format != "text"  # whole records, each with its file (for errors)
    if source.kind == "text":
        ds = ray.data.read_binary_files(paths, filesystem=source.fs, override_num_blocks=blocks)
    elif source.kind == "json":
        ds = ray.data.read_json(paths, filesystem=source.fs, override_num_blocks=blocks,
                                include_paths=records)
    elif source.kind == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=source.fs,
                                   columns=None if records else [data.text_field],
                                   override_num_blocks=blocks, include_paths=records)
    elif source.kind == "hub":
        ds = ray.data.from_huggingface(source.hub)
    else:
        ds = ray.data.from_items([{"text": t} for t in _pydoc_texts()], override_num_blocks=1)
    # batch_size=None: one call per block, so a block's key is a function of its content.
    packed = ds.map_batches(pack_block, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"job": job})
    try:
        return [json.loads(row["part"]) for row in packed.iter_rows()]
    except Exception as e:
        message = spec_error(e)
        if message is None:
            raise
        raise ValueError(message) from e


def local_blocks(source: Source, data: DataConfig, job: PackJob) -> list[dict[str, Any]]:
    """`ray_blocks` without Ray, for the unit tests and benchmarks that pack a small local
    corpus: each file is one block, read with pyarrow the way Ray Data's reader for its kind
    reads it (records carry their file's path, as `include_paths` adds it), and packed here."""
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    records = data.format != "text"
    parts = []
    for f in source.files:
        if source.kind == "json":
            table = pa_json.read_json(source.fs.open_input_stream(f.path))
        elif source.kind == "parquet":
            table = pq.read_table(f.path, filesystem=source.fs,
                                  columns=None if records else [data.text_field])
        else:
            table = pa.table({"bytes": [source.fs.open_input_stream(f.path).read()]})
        if records and source.kind in ("json", "parquet"):
            table = table.append_column("path", pa.array([f.path] * len(table)))
        parts.append(json.loads(pack_block(table, job).column("part")[0].as_py()))
    return parts


_SPEC_ERROR = re.compile(r"ValueError: ((?:data|tokenizer|model)\.\w+: .*)")


def spec_error(error: BaseException) -> str | None:
    """The message of a spec error (a ValueError naming a field, such as a bad record's)
    that a Ray Data worker raised, from the wrappers Ray puts around it
    (`UserCodeException`, `RayTaskError`): found in the exception chain, or in the remote
    traceback Ray carries as text. None for any other failure."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is ValueError and _SPEC_ERROR.fullmatch(f"ValueError: {e}"):
            return str(e)
        stack += [c for c in (e.__cause__, e.__context__, getattr(e, "cause", None))
                  if isinstance(c, BaseException)]
    found = _SPEC_ERROR.search(str(error))
    return found.group(1) if found else None


# --- the tokenizer ----------------------------------------------------------------------


def _entry_tokenizer(fs: pafs.FileSystem, root: str, source: Source, data: DataConfig,
                     tok_cfg: TokenizerConfig, log: Callable[[str], None]) -> Any:
    """The entry's tokenizer when an earlier, killed run wrote it (its shards were cut with
    it), else one trained on a bounded sample (or loaded) and written to the entry,
    tokenizer.json last."""
    from transformers import AutoTokenizer

    from lmforge.data.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="lmforge-tok-") as tmp:
        if fs.get_file_info(f"{root}/tokenizer/tokenizer.json").type == pafs.FileType.File:
            pafs.copy_files(f"{root}/tokenizer", tmp, source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            log("reusing the tokenizer an earlier run wrote to the entry")
            return AutoTokenizer.from_pretrained(tmp)
        if tok_cfg.kind == "pretrained":
            tokenizer = build_tokenizer(tok_cfg, [])
        else:
            t0 = time.perf_counter()
            texts = sample_texts(source, data, tok_cfg.train_sample_bytes)
            tokenizer = build_tokenizer(tok_cfg, texts)
            log(f"{tok_cfg.kind} tokenizer trained on {sum(len(t) for t in texts):,} "
                f"characters in {time.perf_counter() - t0:.1f} s")
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"tokenizer.path: {tok_cfg.path!r} has no fast (tokenizers) "
                             "version; the data stage needs one")
        if data.format != "text":
            # Saved with the tokenizer: checkpoints, the registry and serving then render
            # chats exactly as training saw them.
            template = chat.load_template(data.chat_template)
            if template is not None or not getattr(tokenizer, "chat_template", None):
                tokenizer.chat_template = template or chat.DEFAULT_CHAT_TEMPLATE
            chat.check_template(tokenizer)
        tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json")
        for name in names:  # tokenizer.json last: its presence means the rest is there
            put_bytes(fs, f"{root}/tokenizer/{name}", Path(tmp, name).read_bytes())
        return tokenizer


def _tokenizer_files(fs: pafs.FileSystem, root: str) -> tuple[tuple[str, bytes], ...]:
    """The entry's saved tokenizer files, to rebuild it (with its template) in a worker."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/tokenizer"))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out.append((posixpath.basename(info.path), f.read()))
    return tuple(out)


def sample_texts(source: Source, data: DataConfig, budget: int) -> list[str]:
    """At most `budget` bytes of documents for training the tokenizer, read from the heads
    of files in a stable pseudo-random order (a hash of each path), so the sample spans the
    corpus rather than its first directory, and is the same on every run."""
    if source.kind == "pydoc":
        return _take(_pydoc_texts(), budget)
    if source.kind == "hub":
        return _take((r[data.text_field] for r in source.hub), budget)
    texts: list[str] = []
    left = budget
    for f in sorted(source.files, key=lambda f: hashlib.blake2b(f.path.encode()).digest()):
        if left <= 0:
            break
        got = _take(_file_texts(source, f, data, left), left)
        texts += got
        left -= sum(len(t.encode()) for t in got)
    return texts


def _take(texts: Iterator[str] | Sequence[str], budget: int) -> list[str]:
    out: list[str] = []
    for t in texts:
        if not isinstance(t, str) or not t:
            continue
        if budget <= 0:
            break
        if len(t) > budget:
            t = t[:budget]
        out.append(t)
        budget -= len(t.encode())
    return out


def _file_texts(source: Source, f: SourceFile, data: DataConfig, limit: int) -> Iterator[str]:
    """Documents from the head of one file, reading about `limit` bytes (instruction and
    chat records rendered through the spec's template, or lmforge's default)."""
    fs = source.fs
    template = chat.load_template(data.chat_template) or chat.DEFAULT_CHAT_TEMPLATE
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(f.path) as handle:
            pfile = pq.ParquetFile(handle)
            if data.format != "text":
                for batch in pfile.iter_batches(batch_size=1024):
                    for row in batch.to_pylist():
                        yield from chat.record_texts(row, data.format, template)
                return
            if data.text_field not in pfile.schema_arrow.names:
                raise ValueError(f"data.text_field: column {data.text_field!r} not in "
                                 f"{f.path} (columns: {pfile.schema_arrow.names})")
            for batch in pfile.iter_batches(batch_size=1024, columns=[data.text_field]):
                yield from batch.column(0).to_pylist()
        return
    with fs.open_input_stream(f.path) as stream:
        raw = stream.read(limit)
        truncated = len(raw) == limit and stream.read(1) != b""
    text = raw.decode("utf-8", "ignore")
    if truncated:  # the head of a larger file: keep whole lines (a .txt without any: all)
        cut = text.rfind("\n")
        text = text[:cut + 1] if cut >= 0 else text if source.kind == "text" else ""
    if source.kind == "text":
        yield from documents(text, data.sample_by)
        return
    if text.lstrip().startswith("[") and not truncated:  # a JSON array, not JSON lines
        rows = json.loads(text)
    else:
        rows = (json.loads(line) for line in text.splitlines() if line.strip())
    if data.format != "text":
        for row in rows:
            yield from chat.record_texts(row, data.format, template)
        return
    for i, row in enumerate(rows):
        if i == 0 and data.text_field not in row:
            raise ValueError(f"data.text_field: field {data.text_field!r} not in {f.path} "
                             f"(fields: {sorted(row)})")
        yield row.get(data.text_field)
