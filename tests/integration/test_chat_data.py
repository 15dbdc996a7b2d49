"""Instruction and chat data on real Ray: the data stage reads OpenAI and ShareGPT records
with Ray Data and stores rows whose labels are the replies; a bad record stops it naming
its file and field; two DDP workers train on the rows (the assistant-token validation
loss falls) and rank 0 logs the samples table to MLflow at each evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from lmforge.config import DataConfig, TokenizerConfig, load
from lmforge.data import chat, stage
from lmforge.data.tokenizer import EOS
from lmforge.pipeline import Stages, execute
from lmforge.tracking import RunTracker
from lmforge.train.samples import ARTIFACT

from .helpers import SPEC

BPE = TokenizerConfig(kind="bpe", vocab_size=400)


def write_records(directory: Path, n: int) -> list[str]:
    """`n` questions about Python's docs as OpenAI messages (chat.jsonl) and ShareGPT
    conversations (sharegpt.jsonl), half each; returns the replies."""
    from lmforge.data.examples import pydoc_qa

    records = pydoc_qa(max_chars=60, questions=1)[:n]
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "chat.jsonl", "w") as f, open(directory / "sharegpt.jsonl", "w") as g:
        for i, r in enumerate(records):
            if i % 2:
                g.write(json.dumps({"conversations": [
                    {"from": "human", "value": r["instruction"]},
                    {"from": "gpt", "value": r["output"]}]}) + "\n")
            else:
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]}]}) + "\n")
    return [r["output"] for r in records]


def test_chat_records_on_ray_data(ray_cluster, tmp_path):
    replies = write_records(tmp_path / "records", 80)
    data = DataConfig(path=str(tmp_path / "records"), format="chat",
                      cache_dir=str(tmp_path / "cache"), block_bytes=1024)  # a block a file
    result = stage.run_stage(data, BPE, block_size=64)
    summary = result.summary()
    assert summary["examples"] + summary["dropped"] == 80 and summary["examples"] > 60
    assert summary["blocks"] == 2 and summary["format"] == "chat"
    tok = stage.PreparedData(result.fingerprint, result.entry, result.manifest).tokenizer()
    assert tok.chat_template == chat.DEFAULT_CHAT_TEMPLATE
    labelled = []
    for s in result.manifest.train + result.manifest.validation:
        rows = np.load(Path(result.entry) / s.file)
        _, y, _ = chat.batch_tensors(rows)
        for row in y:
            labelled += [r for r in tok.decode([t for t in row.tolist() if t != -100])
                         .split(EOS) if r]
    assert labelled and all(any(reply.startswith(r) for reply in replies) for r in labelled)

    bad = tmp_path / "bad"
    write_records(bad, 10)
    with open(bad / "chat.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad/chat.jsonl: messages\[0\].role: 'robot'"):
        stage.run_stage(data.model_copy(update={"path": str(bad)}), BPE, block_size=64)


def test_two_workers_train_on_chat_rows_and_log_samples(ray_cluster, tmp_path):
    write_records(tmp_path / "records", 160)
    spec = load(SPEC, [f"data.cache_dir={tmp_path / 'cache'}",
                       f"train.storage_path={tmp_path / 'ray'}",
                       f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                       f"data.path={tmp_path / 'records'}", "data.format=chat",
                       "tokenizer.kind=bpe", "tokenizer.vocab_size=512",
                       "model.block_size=128", "train.steps=30", "train.eval_every=15",
                       "train.samples=2", "train.sample_max_tokens=8"])
    summary = execute(spec, Stages(search=False, register=False, serve_check=False),
                      runs_dir=tmp_path)
    run = RunTracker(summary.tracking_uri, summary.mlflow_run_id)
    val = sorted(run.metric_history("val_loss"))
    assert [step for step, _ in val] == [15, 30]
    assert val[-1][1] < val[0][1], val
    path = MlflowClient(summary.tracking_uri).download_artifacts(
        summary.mlflow_run_id, ARTIFACT, str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["step", "prompt", "completion"]
    assert [row[0] for row in table["data"]] == [15, 15, 30, 30]
    assert all(row[1].startswith("<|user|>\n") for row in table["data"])
