"""Train (byte-level BPE or character-level) or load a tokenizer, as a HF fast tokenizer.

The data stage trains on a bounded sample of the corpus (`tokenizer.train_sample_bytes`),
handed in as a list of texts; a `datasets.Dataset` with a `text` column works too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import datasets
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.config import TokenizerConfig

EOS = "<|endoftext|>"


Texts = Sequence[str] | datasets.Dataset


def build_tokenizer(cfg: TokenizerConfig, corpus: Texts) -> PreTrainedTokenizerFast:
    if cfg.kind == "pretrained":
        tok = AutoTokenizer.from_pretrained(cfg.path)
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer.path: {cfg.path!r} has no end-of-text (eos) token")
    else:
        backend = _train_bpe(cfg.vocab_size, corpus) if cfg.kind == "bpe" else _char(corpus)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batched serving pads with eos, masked out anyway
    return tok


def _texts(corpus: Texts, batch: int = 1000) -> Iterator[list[str]]:
    for i in range(0, len(corpus), batch):
        rows = corpus[i : i + batch]
        yield rows["text"] if isinstance(corpus, datasets.Dataset) else list(rows)


def _train_bpe(vocab_size: int, corpus: Texts) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(corpus), trainer=trainer, length=len(corpus))
    return tok


def _char(corpus: Texts) -> Tokenizer:
    """One token per character seen in the corpus; unseen characters map to EOS.

    `tokenizers` has no character-level trainer, so the vocabulary is collected here and
    handed to its WordLevel model; `(?m).` is Oniguruma for "any character, newline too".
    """
    chars: set[str] = set()
    for texts in _texts(corpus):
        for text in texts:
            chars.update(text)
    vocab = {EOS: 0} | {c: i + 1 for i, c in enumerate(sorted(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok
