"""Samples at each evaluation (`lmforge.train.samples`): the fixed prompts (held-out
examples' prompts, spec prompts through the chat template, text blocks' openings), greedy
completions equal to transformers' greedy `generate`, and the table reaching a real MLflow
store through the TrackingBuffer, appended evaluation after evaluation."""

from __future__ import annotations

import contextlib
import json

import torch
from mlflow.tracking import MlflowClient
from test_chat_data import chat_entry, chat_records  # tests/unit is on sys.path (rootdir)

from lmforge.config import DataConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.data import stage
from lmforge.model import build_model
from lmforge.tracking import RunTracker, TrackingBuffer, experiment_id
from lmforge.train.samples import ARTIFACT, Prompt, complete, sample_prompts, sample_rows


def prepared(result: stage.StageResult) -> stage.PreparedData:
    return stage.PreparedData(result.fingerprint, result.entry, result.manifest)


def test_default_prompts_are_held_out_examples_up_to_the_reply(tmp_path):
    data = prepared(chat_entry(tmp_path, chat_records(60))[0])
    tok = data.tokenizer()
    prompts = sample_prompts(data, TrainConfig(samples=3), 72, tok)
    assert len(prompts) == 3
    questions = {r["messages"][0]["content"] for r in chat_records(60)}
    for p in prompts:
        # "<|user|>\nwhat is N?\n<|assistant|>\n": the prompt /v1/chat/completions renders
        assert p.text.startswith("<|user|>\n") and p.text.endswith("<|assistant|>\n")
        assert p.text.split("\n")[1] in questions
        assert tok.decode(list(p.ids)) == p.text
    assert sample_prompts(data, TrainConfig(samples=0), 72, tok) == []


def test_spec_prompts_are_user_turns_through_the_template(tmp_path):
    data = prepared(chat_entry(tmp_path, chat_records(20))[0])
    tok = data.tokenizer()
    (p,) = sample_prompts(data, TrainConfig(sample_prompts=["what is 7?"]), 72, tok)
    assert p.text == "<|user|>\nwhat is 7?\n<|assistant|>\n"


def test_text_prompts_are_openings_of_validation_blocks(tmp_path, write_jsonl, make_text):
    path = write_jsonl([{"text": make_text(i)} for i in range(30)])
    result = stage.run_stage(DataConfig(path=str(path), cache_dir=str(tmp_path / "c")),
                             TokenizerConfig(kind="char"), run_blocks=stage.local_blocks)
    data = prepared(result)
    prompts = sample_prompts(data, TrainConfig(samples=2), 32, data.tokenizer())
    assert len(prompts) == 2 and all(len(p.ids) == 16 for p in prompts)


def test_greedy_completion_matches_transformers_generate():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_embd=32, n_head=2, block_size=64), 40,
                        0).eval()
    prompt = Prompt("p", (5, 9, 3, 17, 2))
    ours = complete(model.forward, prompt, 12, eos_id=-1, block_size=64,
                    device=torch.device("cpu"), autocast=contextlib.nullcontext)
    theirs = model.generate(torch.tensor([prompt.ids]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert ours == theirs
    # It stops after the end-of-text token.
    stop = complete(model.forward, prompt, 12, eos_id=ours[3], block_size=64,
                    device=torch.device("cpu"), autocast=contextlib.nullcontext)
    assert stop == ours[:ours.index(ours[3]) + 1]
    assert stop == complete(model.forward, prompt, 12, eos_id=ours[3], block_size=64,
                            device=torch.device("cpu"), autocast=contextlib.nullcontext,
                            stop_early=False)


def test_the_samples_table_is_appended_in_mlflow(tmp_path):
    data = prepared(chat_entry(tmp_path, chat_records(30))[0])
    tok = data.tokenizer()
    cfg = TrainConfig(samples=2, sample_max_tokens=4)
    prompts = sample_prompts(data, cfg, 72, tok)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=72),
                        data.vocab_size, data.eos_id)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.start(uri, experiment_id(uri, "samples", tmp_path / "art"), "run")
    buf = TrackingBuffer(tracker.run_id, tracker.client)
    for step in (10, 20):
        rows = sample_rows(model, prompts, step, cfg, tok, data.eos_id, 72,
                           torch.device("cpu"), contextlib.nullcontext)
        buf.log_table(rows, ARTIFACT)
    assert model.training  # put back as it was
    assert buf.close(30).dropped == 0
    path = MlflowClient(uri).download_artifacts(tracker.run_id, ARTIFACT, str(tmp_path))
    table = json.loads(open(path).read())
    assert table["columns"] == ["step", "prompt", "completion"]
    assert [row[0] for row in table["data"]] == [10, 10, 20, 20]
    assert [row[1] for row in table["data"]] == [p.text for p in prompts] * 2
