"""Every spec under jobs/ (bench specs included) loads with lmforge.config.load, and each
top-level spec opens with a comment header showing how to run it locally and on a cluster.
(Whether a spec trains is tested on tiny specs in tests/integration.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.config import load

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SPECS = sorted(JOBS.rglob("*.yaml"))
SHARED = JOBS.parents[1] / "shared"  # the benchmark corpus lives beside the checkout


def test_the_common_cases_are_there():
    names = {p.name for p in JOBS.glob("*.yaml")}
    assert {"quickstart.yaml", "pretrain_gpt2_small.yaml", "finetune_local.yaml",
            "tune_search.yaml", "serve.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(JOBS)))
def test_spec_validates(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if "../shared/" in path.read_text() and not SHARED.is_dir():
        pytest.skip(f"needs {SHARED} (the benchmark corpus), absent beside this checkout")
    if "lmforge data-examples" in _header(path):  # its data is written by the header's command
        from lmforge.data.examples import pydoc_qa, write_jsonl

        monkeypatch.chdir(tmp_path)
        write_jsonl(pydoc_qa(fmt="chat"), tmp_path / yaml.safe_load(path.read_text())["data"]
                    ["path"])
    spec = load(path, [])
    assert spec.tracking.run_name


def _header(path: Path) -> str:
    assert path.read_text().startswith("#")
    return "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))


@pytest.mark.parametrize("path", sorted(set(JOBS.glob("*.yaml")) - {JOBS / "serve.yaml"}),
                         ids=lambda p: p.name)
def test_spec_header_shows_local_and_cluster_commands(path: Path):
    text = _header(path)
    assert "lmforge run" in text or "lmforge train" in text or "lmforge tune" in text
    assert "lmforge submit" in text and "--address" in text


def test_finetune_spec_trains_a_local_checkpoint_with_its_own_tokenizer():
    path = JOBS / "finetune_local.yaml"
    spec = load(path, [])
    assert spec.model.pretrained == spec.tokenizer.path and spec.tokenizer.kind == "pretrained"
    assert "lmforge export" in _header(path)  # how to get such a directory
    # On a cluster the header points both at one directory every node can read.
    submit = _header(path).partition("lmforge submit")[2]
    (where,) = {a.partition("=")[2] for a in submit.split() if a.startswith(
        ("model.pretrained=", "tokenizer.path="))}
    assert where.startswith("/")


def test_finetune_chat_spec_lora_tunes_the_quickstart_champion_on_pydoc_chats():
    text = _header(JOBS / "finetune_chat.yaml")
    assert "make quickstart" in text and "lmforge data-examples pydoc-qa" in text
    assert "lmforge serve models:/lmforge-chat@champion" in text


def test_serve_spec_is_what_lmforge_serve_and_the_cluster_builder_take(monkeypatch):
    from lmforge.serve import serve_app

    path = JOBS / "serve.yaml"
    text = _header(path)
    assert "lmforge serve models:/" in text and "--spec jobs/serve.yaml" in text
    assert "RAY_ADDRESS=auto" in text and "cluster/kuberay/rayservice.yaml" in text
    assert "api_keys" not in path.read_text().partition("\nserve:")[2]  # secrets stay out
    cfg = load(path, []).serve
    assert cfg.min_replicas < cfg.max_replicas and cfg.max_batch_size > 1
    # The same file through the builder a cluster's Serve config calls (RayService).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/unused.db")
    app = serve_app({"model_uri": "models:/m@champion", "spec": str(path)})
    auto = app._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (cfg.min_replicas, cfg.max_replicas)
