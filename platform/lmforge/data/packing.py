"""Tokenize a corpus into one packed token stream, split it, and cache it by fingerprint.

Documents are joined with an end-of-text token into one stream; the first
(1 - val_fraction) of it is training data, the rest validation. Training blocks are
windows of block_size + 1 tokens (inputs and their next-token targets) cut from the
stream at a stride of block_size (see `data.blocks`). The cache directory is named by a
fingerprint of the corpus text and every setting that changes the result, so a second run
with the same inputs reuses the work, and any change makes a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.corpus import load_corpus
from lmforge.data.tokenizer import build_tokenizer

CACHE_VERSION = 1  # bump when the on-disk layout or the packing changes


@dataclass(frozen=True)
class PreparedData:
    """What training needs to find the data; plain values, so Ray can ship it to workers."""

    fingerprint: str
    dir: str
    vocab_size: int
    eos_id: int
    train_tokens: int
    val_tokens: int

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.dir, "tokenizer")

    @property
    def train_path(self) -> str:
        return os.path.join(self.dir, "train.npy")

    @property
    def val_path(self) -> str:
        return os.path.join(self.dir, "val.npy")

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.tokenizer_dir)


def fingerprint(corpus: datasets.Dataset, data: DataConfig, tok: TokenizerConfig) -> str:
    h = hashlib.sha256()
    settings = {
        "version": CACHE_VERSION,
        "val_fraction": data.val_fraction,
        "tokenizer": tok.model_dump(mode="json"),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for i in range(0, len(corpus), 1000):
        for text in corpus[i : i + 1000]["text"]:
            h.update(text.encode())
            h.update(b"\x00")  # document boundary: ["ab"] and ["a", "b"] differ
    return h.hexdigest()[:16]


def prepare_data(data: DataConfig, tok_cfg: TokenizerConfig, block_size: int) -> PreparedData:
    """Load, tokenize, pack and split the corpus, or reuse the cached result."""
    corpus = load_corpus(data)
    fp = fingerprint(corpus, data, tok_cfg)
    final = Path(data.cache_dir).resolve() / fp
    meta = _complete_entry(final)
    if meta is None:
        _build(corpus, tok_cfg, data.val_fraction, final)
        meta = json.loads((final / "meta.json").read_text())
    prepared = PreparedData(fingerprint=fp, dir=str(final), **meta)
    for split, n in (("train", prepared.train_tokens), ("validation", prepared.val_tokens)):
        if n < block_size + 1:
            raise ValueError(
                f"model.block_size: {split} split has {n} tokens, fewer than one block of "
                f"{block_size + 1}; use a larger corpus or a smaller block_size"
            )
    return prepared


_ENTRY_FILES = ("meta.json", "train.npy", "val.npy", "tokenizer")


def _complete_entry(final: Path) -> dict | None:
    """The entry's meta when every file of it is there; None when it must be built. A
    directory that is not a complete entry (emptied, half copied, or made by hand) is moved
    aside, never deleted or trusted, and a warning says where."""
    if not final.exists():
        return None
    try:
        if all((final / f).exists() for f in _ENTRY_FILES):
            return json.loads((final / "meta.json").read_text())
    except ValueError:
        pass
    aside = final.with_name(f".{final.name}-incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    final.rename(aside)
    print(f"[lmforge] warning: data cache entry {final} was incomplete; moved it to {aside} "
          "and building it again", file=sys.stderr, flush=True)
    return None


def _build(corpus: datasets.Dataset, tok_cfg: TokenizerConfig, val_fraction: float,
           final: Path) -> None:
    tokenizer = build_tokenizer(tok_cfg, corpus)
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    encoded = corpus.map(encode, batched=True, remove_columns=["text"], desc="tokenize")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    stream = np.fromiter(
        (t for doc in encoded.with_format("numpy")["ids"] for t in doc), dtype=dtype
    )
    n_val = max(1, int(len(stream) * val_fraction))

    # Build in a sibling temp dir and rename: the entry is complete or absent, and two
    # processes preparing the same data at once both end with a valid cache.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        np.save(tmp / "train.npy", stream[:-n_val])
        np.save(tmp / "val.npy", stream[-n_val:])
        meta = {"vocab_size": len(tokenizer), "eos_id": eos,
                "train_tokens": len(stream) - n_val, "val_tokens": n_val}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its entry is identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
