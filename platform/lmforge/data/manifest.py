"""A data cache entry's table of contents: what the data stage wrote and workers read.

An entry lives under `data.cache_dir` (a local directory, a shared mount or an
object-store URI) and is named by its fingerprint:

    CACHE/<fingerprint>/
      manifest.json          written last, in one put: present means every file it names
                             is whole (a killed stage leaves no manifest)
      tokenizer/             the Hugging Face tokenizer (tokenizer.json, its config)
      train/00000.npy ...    1-D token arrays (the manifest's dtype); each document is
      validation/00000.npy   followed by the end-of-text token

Training examples are windows of block_size + 1 tokens cut from one shard at a stride of
block_size (a window never crosses shards), so the block size stays out of the
fingerprint and one entry serves every block size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

MANIFEST = "manifest.json"
VERSION = 2  # bump when the entry's layout or the packing changes
Split = Literal["train", "validation"]


@dataclass(frozen=True)
class Shard:
    file: str
    """Path relative to the entry, e.g. `train/00003.npy`."""
    tokens: int


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

    def shards(self, split: Split) -> tuple[Shard, ...]:
        return self.train if split == "train" else self.validation

    def tokens(self, split: Split) -> int:
        return sum(s.tokens for s in self.shards(split))

    def block_offsets(self, split: Split, block_size: int) -> np.ndarray:
        """Cumulative block counts: shard i holds global blocks [off[i], off[i + 1]).
        A shard of n tokens holds (n - 1) // block_size windows of block_size + 1."""
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
