"""A data cache entry's table of contents: what the data stage wrote and workers read.

An entry lives under `data.cache_dir` (a local directory, a shared mount or an
object-store URI) and is named by its fingerprint:

    CACHE/<fingerprint>/
      manifest.json          written last, in one put: present means every file it names
                             is whole (a killed stage leaves no manifest)
      tokenizer/             the Hugging Face tokenizer (tokenizer.json, its config)
      train/<key>-0000.npy   1-D token arrays (the manifest's dtype); each document is
      validation/...         followed by the end-of-text token. The data stage
                             (`data.stage`) names a shard by the hash of its block of
                             input; readers take every name from the manifest
      parts/<key>.json       the stage's per-block done markers (not read by workers)

Training examples are windows of block_size + 1 tokens cut from one shard at a stride of
block_size (a window never crosses shards), so the block size stays out of the
fingerprint and one entry serves every block size.

An `instruction` or `chat` entry (`format`) is built for one block size instead: each shard
is an int32 array of rows (rows, 3, block_size + 1) holding token ids, position ids and the
loss mask of whole examples (`data.chat`), and a training example is one row.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow.fs

from lmforge import storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MANIFEST = "manifest.json"
VERSION = 3  # bump when the entry's layout or the packing changes (3: the Ray Data stage)
Split = Literal["train", "validation"]


@dataclass(frozen=True)
class Shard:
    file: str
    """Path relative to the entry, e.g. `train/00003.npy`."""
    tokens: int
    """Tokens in the shard (for rows: the examples' tokens, padding excluded)."""
    rows: int = 0
    """Rows of examples (`instruction`/`chat` entries); 0 for a token stream."""


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    dtype: str
    """numpy dtype of every shard: `uint16`, or `uint32` for vocabularies over 65,535."""
    vocab_size: int
    eos_id: int
    train: tuple[Shard, ...]
    validation: tuple[Shard, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    """The data and tokenizer settings the entry was built from."""
    source: dict[str, Any] = field(default_factory=dict)
    """What was read: the file listing (path, size, mtime or etag) or the hub id."""
    version: int = VERSION
    format: str = "text"
    """`text` (a token stream per shard) or `instruction`/`chat` (rows of examples)."""
    block_size: int | None = None
    """The block size rows were cut for (`instruction`/`chat` entries only)."""
    stats: dict[str, int] = field(default_factory=dict)
    """`instruction`/`chat`: examples stored, truncated and dropped, tokens, loss tokens."""

    @property
    def rows(self) -> bool:
        """Whether shards hold rows of examples rather than a token stream."""
        return self.format != "text"

    def shards(self, split: Split) -> tuple[Shard, ...]:
        return self.train if split == "train" else self.validation

    def tokens(self, split: Split) -> int:
        return sum(s.tokens for s in self.shards(split))

    def block_offsets(self, split: Split, block_size: int) -> np.ndarray:
        """Cumulative block counts: shard i holds global blocks [off[i], off[i + 1]).
        A shard of n tokens holds (n - 1) // block_size windows of block_size + 1; a shard of
        rows holds one block per row."""
        if self.rows:
            if block_size != self.block_size:
                raise ValueError(f"model.block_size: {block_size}, but this {self.format} "
                                 f"entry was cut into rows for {self.block_size}")
            counts = [s.rows for s in self.shards(split)]
        else:
            counts = [max(0, (s.tokens - 1) // block_size) for s in self.shards(split)]
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("version") != VERSION:
            raise ValueError(f"manifest version {raw.get('version')}, expected {VERSION}")
        for split in ("train", "validation"):
            raw[split] = tuple(Shard(**s) for s in raw[split])
        return cls(**raw)


def join(entry: str, relative: str) -> str:
    """`relative` (a manifest's `train/00000.npy`) inside `entry`, a local directory or a URI."""
    return f"{entry.rstrip('/')}/{relative}" if storage.is_uri(entry) else os.path.join(
        entry, relative)


def write_manifest(entry: str, manifest: Manifest) -> None:
    """Write the entry's manifest.json, last and atomically: a local file under a temp name
    renamed into place, or one object put (an object store shows a whole object or none).
    A reader then sees no manifest or a whole one, never a partial file."""
    if storage.is_uri(entry):
        fs, inner = storage.filesystem(join(entry, MANIFEST), "data.cache_dir")
        with fs.open_output_stream(inner) as f:
            f.write(manifest.to_json().encode())
        return
    tmp = os.path.join(entry, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
    os.replace(tmp, os.path.join(entry, MANIFEST))


def read_manifest(entry: str) -> Manifest | None:
    """The manifest of `entry` (local directory or URI); None when the entry has none (it
    is absent or incomplete). A manifest of another VERSION raises ValueError."""
    fs, inner = storage.filesystem(join(entry, MANIFEST), "data.cache_dir")
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return Manifest.from_json(f.read().decode())


@dataclass(frozen=True)
class PreparedData:
    """A complete cache entry, as training finds it: plain values, so Ray ships it to every
    worker, which opens the shards itself (`data.blocks`). `entry` is a local directory or
    an object-store URI; files of a URI entry are read through `storage.local_copy`."""

    fingerprint: str
    entry: str
    manifest: Manifest

    @classmethod
    def open(cls, entry: str) -> PreparedData:
        """The entry at `entry`; FileNotFoundError naming it when it has no manifest."""
        manifest = read_manifest(entry)
        if manifest is None:
            raise FileNotFoundError(f"data cache entry {entry} has no {MANIFEST}: it is "
                                    "missing or was never finished")
        return cls(manifest.fingerprint, entry, manifest)

    def path(self, relative: str) -> str:
        """Where `relative` lives: a local path, or a URI for a remote entry."""
        return join(self.entry, relative)

    def local_path(self, relative: str) -> str:
        """A local path holding `relative` (downloaded once per host for a remote entry)."""
        return storage.local_copy(self.path(relative))

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    @property
    def train_tokens(self) -> int:
        return self.manifest.tokens("train")

    @property
    def val_tokens(self) -> int:
        return self.manifest.tokens("validation")

    @property  # not cached: a pickled copy would carry the driver's local path to workers
    def tokenizer_dir(self) -> str:
        """The tokenizer as a local directory (a copy on this host for a remote entry)."""
        return self.local_path("tokenizer")

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)
