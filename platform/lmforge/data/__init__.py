"""Data stage: corpus (Ray Data readers) -> tokenizer (tokenizers, on a sample) -> token
shards and a manifest, cached by fingerprint (`stage`); the workers' reader (`blocks`)."""

from lmforge.data.blocks import BlockShard, ValidationSet
from lmforge.data.manifest import PreparedData
from lmforge.data.stage import prepare_data
from lmforge.data.tokenizer import build_tokenizer

__all__ = ["BlockShard", "PreparedData", "ValidationSet", "build_tokenizer", "prepare_data"]
