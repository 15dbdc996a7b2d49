"""The offline fine-tuning chain on real Ray, MLflow and Serve: a model lmforge pretrained
and registered is the base (`models:/NAME@champion`) of a LoRA fine-tune with 2 workers;
the held-out loss goes down, the registered model is the merge with its adapter and base
recorded beside it, and it answers through the official `openai` client's chat API with
the fine-tuned tokenizer's template."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from mlflow.tracking import MlflowClient
from ray import serve

from lmforge.config import JobSpec
from lmforge.data.examples import pydoc_qa, write_jsonl
from lmforge.pipeline import Stages, execute
from lmforge.registry import load_model
from lmforge.serve import deploy, serving_app
from lmforge.tracking import RunTracker

pytestmark = pytest.mark.long  # pretrain, LoRA fine-tune and serve: minutes (`make test-long`)

REGISTER = Stages(search=False, register=True, serve_check=False)


BLOCK = 192  # a question and its (60-character) answer, in characters


def finetune_overrides(chats: Path) -> list[str]:
    """LoRA on the registered tiny model, with its own tokenizer, on pydoc Q&A chats."""
    base = "models:/lmforge-tiny@champion"
    return [f"data.path={chats}", "data.format=chat", "data.val_fraction=0.2",
            f"model.pretrained={base}", "tokenizer.kind=pretrained", f"tokenizer.path={base}",
            f"model.block_size={BLOCK}", "train.method=lora", "train.lora.r=8",
            "train.lora.alpha=16", "train.lr=1e-2", "train.steps=40", "train.eval_every=10",
            "train.warmup_steps=2", "registry.model_name=lmforge-tiny-chat"]


@pytest.fixture
def pretrained(ray_cluster, tiny_spec, tmp_path: Path) -> JobSpec:
    """Version 1 of `lmforge-tiny`, champion: a tiny GPT-2 lmforge trained itself on
    Python's docs (plain text)."""
    spec = tiny_spec("train.steps=30", "tracking.run_name=pretrain", f"model.block_size={BLOCK}")
    summary = execute(spec, REGISTER, runs_dir=tmp_path)
    assert summary.promotion["promoted"]
    return spec


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    """The offline pydoc Q&A set as chat records, short answers."""
    path = tmp_path / "pydoc_qa.jsonl"
    write_jsonl(pydoc_qa(max_chars=60, fmt="chat", questions=1), path)
    return path


def test_lora_finetune_of_a_registered_model_is_registered_merged_and_chats(
        pretrained: JobSpec, chats: Path, tiny_spec, tmp_path: Path):
    spec = tiny_spec(*finetune_overrides(chats), "tracking.run_name=finetune")
    summary = execute(spec, REGISTER, runs_dir=tmp_path)

    # The held-out loss on the assistant's tokens went down from the first evaluation.
    run = RunTracker(summary.tracking_uri, summary.mlflow_run_id)
    val = [v for _, v in run.metric_history("val_loss")]
    assert len(val) == 4 and val[-1] < val[0] and summary.best_val_loss < val[0], val
    params = run.client.get_run(run.run_id).data.params
    assert params["model.pretrained"] == "models:/lmforge-tiny/1"  # the alias, pinned
    assert 0 < int(params["model.trainable_parameters"]) < int(params["model.parameters"]) / 4

    # Registered: the merged model, its adapter and its base beside it.
    client = MlflowClient(summary.tracking_uri)
    version = client.get_model_version("lmforge-tiny-chat", str(summary.registered_version))
    assert version.tags["lmforge.method"] == "lora"
    assert version.tags["lmforge.base_model"] == "models:/lmforge-tiny/1"
    adapter = {a.path for a in client.list_artifacts(version.run_id, "adapter")}
    assert adapter == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    loaded = load_model(summary.model_uri, summary.tracking_uri)
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())

    # Served unchanged, answering the official client's chat API with the template.
    url = deploy(serving_app(summary.model_uri, spec.serve, summary.tracking_uri), spec.serve,
                 name="finetuned")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is a module?"}]
        served = client.models.list().data[0].id  # the endpoint names what it serves
        chat = client.chat.completions.create(model=served, messages=messages,
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.completion_tokens >= 1
        # The prompt is the conversation rendered by the template saved with the
        # fine-tune's tokenizer (lmforge's default: `<|user|>` ... `<|assistant|>`).
        assert "<|assistant|>" in loaded.tokenizer.chat_template
        rendered = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=False)
        assert rendered.endswith("<|assistant|>\n")
        assert chat.usage.prompt_tokens == len(loaded.tokenizer(rendered)["input_ids"])
    finally:
        serve.shutdown()
