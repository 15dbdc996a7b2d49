"""Shared fixtures for the unit tests: small corpora, a char tokenizer, a tiny GPT-2.

Nothing here starts Ray or touches the network; every file goes under a pytest tmp dir.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig, TokenizerConfig
from lmforge.data.manifest import Manifest, PreparedData, Shard, write_manifest
from lmforge.data.tokenizer import build_tokenizer
from lmforge.model import build_model

_WORDS = (
    "the a model token stream batch worker ray train tune serve cluster loss step rate "
    "decay warmup shard block corpus data text line file spec field value python code "
    "quick brown fox jumps over lazy dog alpha beta gamma delta epsilon zeta eta theta"
).split()


def make_text(seed: int, paragraphs: int = 6) -> str:
    """A few hundred bytes of varied text per paragraph: words, digits, punctuation, code."""
    rng = random.Random(seed)
    out = []
    for p in range(paragraphs):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(30, 60))]
        sentence = " ".join(words).capitalize() + f". Number {rng.randint(0, 99999)}!"
        code = f"def f_{p}(x):\n    return x * {rng.randint(2, 9)}  # {rng.choice(_WORDS)}\n"
        out.append(sentence + "\n" + code)
    return "\n".join(out)


CORPUS_TEXT = make_text(0, paragraphs=12)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 4 KB of varied text: prose, digits, punctuation, indented code."""
    return CORPUS_TEXT


@pytest.fixture(name="make_text", scope="session")
def make_text_fixture() -> Callable[..., str]:
    return make_text


@pytest.fixture(autouse=True, scope="session")
def _isolate_hf_datasets(tmp_path_factory: pytest.TempPathFactory):
    """`datasets` caches parsed local files; keep that cache in a tmp dir, offline."""
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    yield
    mp.undo()


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """write_spec("train: {steps: 5}") -> path of a YAML spec file in tmp_path."""

    def write(body: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(body)
        return path

    return write


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    def write(rows: list[dict], name: str = "corpus.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


def make_entry(directory: Path, train: list[np.ndarray], validation: list[np.ndarray],
               fingerprint: str = "f" * 16) -> PreparedData:
    """A cache entry in the manifest layout holding the given token shards (no tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    shards: dict[str, tuple[Shard, ...]] = {}
    for split, arrays in (("train", train), ("validation", validation)):
        (directory / split).mkdir()
        shards[split] = tuple(Shard(f"{split}/{i:05d}.npy", len(a)) for i, a in enumerate(arrays))
        for shard, a in zip(shards[split], arrays, strict=True):
            np.save(directory / shard.file, a)
    manifest = Manifest(fingerprint=fingerprint, dtype=np.dtype(train[0].dtype).name,
                        vocab_size=65536, eos_id=0, train=shards["train"],
                        validation=shards["validation"])
    write_manifest(str(directory), manifest)
    return PreparedData(fingerprint, str(directory), manifest)


@pytest.fixture
def write_entry(tmp_path: Path) -> Callable[..., PreparedData]:
    """write_entry(train=[n, ...], validation=[m, ...]) -> an entry whose shards hold the
    token stream 0, 1, 2, ... (train shards, then validation), so a token is its own global
    position, which makes windows easy to check. An array in place of a size is written as
    it is."""

    def write(train: list[int | np.ndarray], validation: list[int | np.ndarray] = (9,),
              name: str = "entry") -> PreparedData:
        arrays, position = [], 0
        for part in [*train, *validation]:
            if isinstance(part, int):
                part = np.arange(position, position + part, dtype=np.uint32)
            arrays.append(part)
            position += len(part)
        return make_entry(tmp_path / name, arrays[: len(train)], arrays[len(train) :])

    return write


@pytest.fixture(scope="session")
def char_tok():
    """A character tokenizer over CORPUS_TEXT (about 45 symbols plus <|endoftext|>)."""
    return build_tokenizer(TokenizerConfig(kind="char"),
                           datasets.Dataset.from_dict({"text": [CORPUS_TEXT]}))


TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=64)


@pytest.fixture
def tiny_model(char_tok):
    """A randomly initialised 1-layer GPT-2 (fixed seed) over the char vocabulary."""
    torch.manual_seed(0)
    return build_model(TINY, len(char_tok), char_tok.eos_token_id).eval()


@pytest.fixture
def tokenizer_dir(char_tok, tmp_path: Path) -> str:
    d = tmp_path / "tokenizer"
    char_tok.save_pretrained(d)
    return str(d)


@pytest.fixture
def process_group(tmp_path):
    """A one-rank gloo group: enough for FSDP2 (DTensor parameters and moments) and
    distributed checkpoints without Ray."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()
