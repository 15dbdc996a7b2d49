"""Load a corpus as a Hugging Face `datasets.Dataset` with one `text` column."""

from __future__ import annotations

from pathlib import Path

import datasets

from lmforge.config import DataConfig, corpus_files

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_corpus(cfg: DataConfig) -> datasets.Dataset:
    """The spec's corpus: local files, a hub dataset, or Python's bundled docs."""
    if cfg.path is not None:
        ds = _load_local(cfg)
    elif cfg.hub_id is not None:
        ds = datasets.load_dataset(cfg.hub_id, split=cfg.hub_split)
    else:
        ds = _pydoc_topics()
    if cfg.text_field not in ds.column_names:
        raise ValueError(
            f"data.text_field: column {cfg.text_field!r} not in the corpus "
            f"(columns: {ds.column_names})"
        )
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True)


def _load_local(cfg: DataConfig) -> datasets.Dataset:
    files = corpus_files(cfg.path or "")
    kinds = {_BUILDERS.get(Path(f).suffix, "text") for f in files}
    if len(kinds) != 1:
        raise ValueError(f"data.path: mixes file kinds {sorted(kinds)}; use one kind per corpus")
    builder = kinds.pop()
    kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
    # datasets caches the parsed files itself, keyed by their path, size and mtime.
    return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)


def _pydoc_topics() -> datasets.Dataset:
    """Python's documentation topics (~460 KB of English prose and code) as documents."""
    from pydoc_data.topics import topics

    return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
