"""LoRA (`train.method: lora`): only the adapters train and sit in the optimizer; the
checkpoint holds the adapter only and resumes exactly, unsharded and under FSDP2; the
merged model computes what the adapted one does; the spec refuses what cannot run, naming
the field; a registered model serves as the base (`models:/NAME/VERSION`, downloaded
once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmforge.config import JobSpec, SpecError, load
from lmforge.registry import local_model_dir, pinned
from lmforge.train.checkpoint import export_hf, load_checkpoint, save_checkpoint
from lmforge.train.lora import ADAPTER_DIR, apply_lora, trainable_parameters
from lmforge.train.parallel import Parallel
from lmforge.train.step import make_optimizer, train_step


@pytest.fixture
def base_dir(tiny_model, char_tok, tmp_path: Path) -> str:
    """The tiny GPT-2 and its tokenizer as a local Hugging Face directory."""
    d = tmp_path / "base"
    tiny_model.save_pretrained(d)
    char_tok.save_pretrained(d)
    return str(d)


def lora_spec(base: str, **train) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"pretrained": base, "block_size": 64},
        "train": {"method": "lora", "steps": 10, "warmup_steps": 0, "lr": 1e-2,
                  "lora": {"r": 4, "alpha": 8}, **train}})


def adapted(spec: JobSpec, base: str):
    torch.manual_seed(spec.train.seed)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    return apply_lora(model, spec.train, base)


def train(model, spec: JobSpec, steps: int, optimizer=None):
    par = Parallel(spec.train, torch.device("cpu"))
    optimizer = optimizer or make_optimizer(model, spec.train)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        train_step(model, par, optimizer, [(x, x)], spec.train.lr)
    return par, optimizer


def test_only_the_adapters_train_and_are_optimized(base_dir):
    spec = lora_spec(base_dir)
    model = adapted(spec, base_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # every attention and MLP projection of GPT-2 got one (A and B each)
    assert {n.split(".")[-4] for n in trainable} == {"c_attn", "c_proj", "c_fc"}
    optimizer = make_optimizer(model, spec.train)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, spec, 3, optimizer)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()
               if not p.requires_grad)
    # r * (in + out) per projection: c_attn 32->96, attn c_proj 32->32, c_fc 32->128,
    # mlp c_proj 128->32, one layer
    assert trainable_parameters(model) == 4 * ((32 + 96) + (32 + 32) + 2 * (32 + 128))


def test_llama_default_targets_every_projection():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    spec = JobSpec.model_validate({"model": {"pretrained": "x"}, "train": {"method": "lora"}})
    model = apply_lora(LlamaForCausalLM(cfg), spec.train, "x")
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_target_modules_are_refused_naming_the_field(base_dir):
    spec = lora_spec(base_dir, lora={"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match=r"train\.lora\.target_modules"):
        adapted(spec, base_dir)


def test_merged_model_computes_what_the_adapted_one_does(base_dir, tokenizer_dir, tmp_path):
    spec = lora_spec(base_dir)
    model = adapted(spec, base_dir)
    par, optimizer = train(model, spec, 3)  # B != 0: the adapters change the output
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint(ckpt, model, par, optimizer, 0, tokenizer_dir, {"step": 3})
    out = export_hf(ckpt, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16),
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval()(input_ids=x).logits
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-5)
        assert not torch.allclose(base(input_ids=x).logits, want, atol=1e-3)
    assert {p.name for p in (out / ADAPTER_DIR).iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json"}
    assert (out / "tokenizer.json").exists() and not (out / "optimizer.pt").exists()


def test_checkpoint_holds_the_adapter_only_and_resumes_exactly(base_dir, tokenizer_dir,
                                                               tmp_path):
    spec = lora_spec(base_dir)
    model = adapted(spec, base_dir)
    par, optimizer = train(model, spec, 2)
    save_checkpoint(tmp_path, model, par, optimizer, 0, tokenizer_dir, {"step": 2})
    assert not (tmp_path / "model.safetensors").exists()
    adapter_bytes = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 4 * trainable_parameters(model) + 10_000  # fp32 adapters, a header
    assert json.loads((tmp_path / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == base_dir

    restored = adapted(spec, base_dir)  # fresh adapters: different until loaded
    restored_opt = make_optimizer(restored, spec.train)
    load_checkpoint(tmp_path, restored, par, restored_opt, 0)
    train(model, spec, 2, optimizer)
    train(restored, spec, 2, restored_opt)  # equal only if the optimizer state came back too
    for (n, a), b in zip(model.state_dict().items(), restored.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), n


def test_under_fsdp2_the_adapters_train_as_unsharded_and_resume_exactly(
        base_dir, tokenizer_dir, tmp_path, process_group):
    """FSDP2 (a one-rank gloo group: DTensor parameters and moments) shards base and
    adapters per block: training gives the unsharded run's adapters; its checkpoint is the
    adapter only, gathered whole, and a fresh sharded model resumes from it exactly."""
    def sharded(spec: JobSpec):
        model = adapted(spec, base_dir)
        par = Parallel(spec.train, torch.device("cpu"))
        model = par.wrap(model)
        return model, par, make_optimizer(model, spec.train)

    def whole(model) -> dict[str, torch.Tensor]:
        return {n: getattr(v, "full_tensor", lambda v=v: v)().detach()
                for n, v in model.state_dict().items()}

    spec = lora_spec(base_dir, strategy="fsdp")
    model, par, optimizer = sharded(spec)
    reference = adapted(lora_spec(base_dir), base_dir)  # the same adapters, unsharded
    train(reference, lora_spec(base_dir), 2)
    train(model, spec, 2, optimizer)
    for n, want in whole(reference).items():
        assert torch.allclose(whole(model)[n], want, atol=1e-6), n

    save_checkpoint(tmp_path, model, par, optimizer, 0, tokenizer_dir, {"step": 2})
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < \
        4 * trainable_parameters(model) + 10_000  # the adapters, whole, fp32
    restored, _, restored_opt = sharded(spec)  # fresh adapters: different until loaded
    load_checkpoint(tmp_path, restored, par, restored_opt, 0)
    train(model, spec, 2, optimizer)
    train(restored, spec, 2, restored_opt)  # equal only if the optimizer state came back too
    ours, theirs = whole(model), whole(restored)
    for n, a in ours.items():
        assert torch.equal(a, theirs[n]), n


def test_a_full_checkpoint_is_not_loaded_as_an_adapter(base_dir, tiny_model, tokenizer_dir,
                                                       tmp_path):
    full = JobSpec.model_validate({"model": {"block_size": 64}})
    par = Parallel(full.train, torch.device("cpu"))
    save_checkpoint(tmp_path, tiny_model, par, make_optimizer(tiny_model, full.train), 0,
                    tokenizer_dir, {"step": 1})
    spec = lora_spec(base_dir)
    model = adapted(spec, base_dir)
    with pytest.raises(ValueError, match="another train.method"):
        load_checkpoint(tmp_path, model, Parallel(spec.train, torch.device("cpu")),
                        make_optimizer(model, spec.train), 0)


def spec_file(write_spec, body: dict) -> Path:
    return write_spec(yaml.safe_dump(body))


def test_spec_refusals_name_the_fields(write_spec):
    with pytest.raises(SpecError, match=r"train\.method.*qlora.*train\.use_gpu"):
        load(spec_file(write_spec, {"model": {"pretrained": "m"},
                                    "train": {"method": "qlora"}}))
    with pytest.raises(SpecError, match=r"train\.method.*model\.pretrained"):
        load(spec_file(write_spec, {"train": {"method": "lora"}}))
    with pytest.raises(SpecError, match=r"train\.lora\.r"):
        load(spec_file(write_spec, {"model": {"pretrained": "m"}, "train": {"lora": {"r": 0}}}))


def test_lora_fields_are_searchable(write_spec):
    space = {"train.lora.r": {"type": "choice", "values": [4, 16]},
             "train.lora.alpha": {"type": "uniform", "low": 8, "high": 32},
             "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    spec = load(spec_file(write_spec, {"model": {"pretrained": "m"},
                                       "train": {"method": "lora"},
                                       "tune": {"search_space": space}}))
    trial = spec.with_values({"train.lora.r": 16, "train.lora.alpha": 20.0, "train.lr": 1e-3})
    assert (trial.train.lora.r, trial.train.lora.alpha, trial.train.lr) == (16, 20.0, 1e-3)
    for bad in ("train.lora", "train.lora.rank", "train.lr.x"):
        with pytest.raises(SpecError, match="not a spec field path"):
            load(spec_file(write_spec, {"tune": {"search_space": {
                bad: {"type": "int", "low": 1, "high": 2}}}}))


def test_a_registered_model_is_downloaded_once_as_a_base(artifact_version, tmp_path):
    uri, tracking_uri = artifact_version
    assert pinned(uri.replace("/1", "@champion"), tracking_uri) == uri
    first = local_model_dir(uri.replace("/1", "@champion"), tracking_uri, "model.pretrained",
                            root=tmp_path / "models")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in Path(first).iterdir()}
    (Path(first) / "marker").touch()  # a second call reuses the copy
    assert local_model_dir(uri, tracking_uri, "model.pretrained", root=tmp_path / "models") \
        == first and (Path(first) / "marker").exists()
    assert local_model_dir("/some/dir", tracking_uri, "model.pretrained") == "/some/dir"
    with pytest.raises(ValueError, match="model.pretrained"):
        local_model_dir(uri, None, "model.pretrained")


@pytest.fixture
def artifact_version(tiny_model, char_tok, tmp_path: Path) -> tuple[str, str]:
    """Version 1 of model `base` (alias champion) in a sqlite registry, laid out as MLflow's
    transformers flavor stores it."""
    root = tmp_path / "artifact"
    tiny_model.save_pretrained(root / "model")
    char_tok.save_pretrained(root / "components" / "tokenizer")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    client.create_registered_model("base")
    client.create_model_version("base", root.as_uri())
    client.set_registered_model_alias("base", "champion", "1")
    return "models:/base/1", tracking_uri


def test_qlora_is_refused_before_any_worker_starts_naming_the_field(monkeypatch):
    import importlib.util

    from lmforge.config import TrainConfig
    from lmforge.train.lora import check_supported

    gpu = {"method": "qlora", "use_gpu": True}
    with pytest.raises(ValueError, match=r"train\.method.*train\.strategy"):
        check_supported(TrainConfig(**gpu, strategy="fsdp"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"train\.method.*bitsandbytes"):
        check_supported(TrainConfig(**gpu))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ValueError, match=r"train\.method: 'qlora' is not available"):
        check_supported(TrainConfig(**gpu))
    check_supported(TrainConfig(method="lora"))  # lora and full pass
