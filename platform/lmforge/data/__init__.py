"""Data stage: corpus (HF datasets) -> tokenizer (tokenizers) -> packed, split, cached."""

from lmforge.data.blocks import BlockShard, ValidationSet
from lmforge.data.corpus import load_corpus
from lmforge.data.manifest import PreparedData
from lmforge.data.packing import prepare_data
from lmforge.data.tokenizer import build_tokenizer

__all__ = ["BlockShard", "PreparedData", "ValidationSet", "build_tokenizer", "load_corpus",
           "prepare_data"]
