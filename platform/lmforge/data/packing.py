"""Tokenize a corpus into one packed token stream, split it, and cache it by fingerprint.

Documents are joined with an end-of-text token into one stream; the first
(1 - val_fraction) of it is training data, the rest validation. The entry is written in
the layout `data.manifest` describes (tokenizer/, train/NNNNN.npy shards of at most
SHARD_TOKENS tokens, validation/00000.npy, manifest.json last), which is what workers
read (`data.blocks`). The entry is named by a fingerprint of the corpus text and every
setting that changes the result, so a second run with the same inputs reuses the work,
and any change makes a new entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.corpus import load_corpus
from lmforge.data.manifest import (
    VERSION,
    Manifest,
    PreparedData,
    Shard,
    read_manifest,
    write_manifest,
)
from lmforge.data.tokenizer import build_tokenizer

SHARD_TOKENS = 1 << 27  # tokens per shard file (256 MB of uint16); windows never cross shards


def fingerprint(corpus: datasets.Dataset, data: DataConfig, tok: TokenizerConfig) -> str:
    h = hashlib.sha256()
    settings = {
        "version": VERSION,
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
    """Load, tokenize, pack and split the corpus, or reuse the cached entry."""
    corpus = load_corpus(data)
    fp = fingerprint(corpus, data, tok_cfg)
    final = Path(data.cache_dir).resolve() / fp
    manifest = _complete_entry(final)
    if manifest is None:
        settings = {"val_fraction": data.val_fraction, "tokenizer": tok_cfg.model_dump(mode="json")}
        source = {"path": data.path, "hub_id": data.hub_id, "text_field": data.text_field,
                  "sample_by": data.sample_by, "documents": len(corpus)}
        _build(corpus, tok_cfg, data.val_fraction, final, fp, settings, source)
        manifest = read_manifest(str(final))
        assert manifest is not None  # _build renamed a finished entry into place
    prepared = PreparedData(fingerprint=fp, entry=str(final), manifest=manifest)
    for split, n in (("train", prepared.train_tokens), ("validation", prepared.val_tokens)):
        if manifest.block_offsets(split, block_size)[-1] == 0:
            raise ValueError(
                f"model.block_size: {split} split has {n} tokens, fewer than one block of "
                f"{block_size + 1}; use a larger corpus or a smaller block_size"
            )
    return prepared


def _complete_entry(final: Path) -> Manifest | None:
    """The entry's manifest when the entry is whole; None when it must be built. An entry
    is whole when its manifest (written last) is there and readable and every file it names
    exists. A directory that is not a whole entry (killed mid-build, emptied, half copied,
    or made by hand) is moved aside, never deleted or trusted, and a warning says where."""
    if not final.exists():
        return None
    try:
        manifest = read_manifest(str(final))
        if manifest is not None and (final / "tokenizer").is_dir() and all(
                (final / s.file).is_file() for s in manifest.train + manifest.validation):
            return manifest
    except (ValueError, TypeError, KeyError):  # unreadable or of another layout
        pass
    aside = final.with_name(f".{final.name}-incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    final.rename(aside)
    print(f"[lmforge] warning: data cache entry {final} was incomplete; moved it to {aside} "
          "and building it again", file=sys.stderr, flush=True)
    return None


def _write_shards(tmp: Path, split: str, stream: np.ndarray) -> tuple[Shard, ...]:
    (tmp / split).mkdir()
    shards = []
    for i, start in enumerate(range(0, max(1, len(stream)), SHARD_TOKENS)):
        file = f"{split}/{i:05d}.npy"
        np.save(tmp / file, stream[start : start + SHARD_TOKENS])
        shards.append(Shard(file=file, tokens=len(stream[start : start + SHARD_TOKENS])))
    return tuple(shards)


def _build(corpus: datasets.Dataset, tok_cfg: TokenizerConfig, val_fraction: float,
           final: Path, fp: str, settings: dict[str, Any], source: dict[str, Any]) -> None:
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
    # processes preparing the same data at once both end with a valid cache. The manifest
    # is still written last, as the layout requires of every writer.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = Manifest(fingerprint=fp, dtype=np.dtype(dtype).name,
                            vocab_size=len(tokenizer), eos_id=eos,
                            train=_write_shards(tmp, "train", stream[:-n_val]),
                            validation=_write_shards(tmp, "validation", stream[-n_val:]),
                            settings=settings, source=source)
        write_manifest(str(tmp), manifest)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race; its entry is identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
