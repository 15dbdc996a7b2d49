"""Job spec loading: every error names the spec file and the field; overrides; the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import JobSpec, SpecError, TrainConfig, load, parse_overrides


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths in specs (data.cache_dir, storage paths) resolve under tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def spec_error(path: Path | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as info:
        load(path, overrides)
    return str(info.value)


# --- errors: each names the file and the dotted field ---------------------------------

FIELD_ERRORS = {
    "unknown top-level section": ("trainz: {steps: 5}\n", [], ["trainz", "unknown field"]),
    "unknown nested key": ("train: {stepz: 5}\n", [], ["train.stepz", "unknown field"]),
    "wrong type": ("train: {steps: ten}\n", [], ["train.steps", "'ten'"]),
    "out of range (steps)": ("train: {steps: 0}\n", [], ["train.steps", "greater than 0"]),
    "out of range (val_fraction)": ("data: {val_fraction: 0.9}\n", [], ["data.val_fraction"]),
    "missing corpus file": ("data: {path: nowhere/corpus.txt}\n", [],
                            ["data.path", "nowhere/corpus.txt"]),
    "heads do not divide width": ("model: {n_embd: 10, n_head: 3}\n", [],
                                  ["model.n_embd", "model.n_head"]),
    "warmup not shorter than steps": ("train: {steps: 10, warmup_steps: 10}\n", [],
                                      ["train.warmup_steps", "train.steps"]),
    "search path not a spec field": (
        "tune: {search_space: {train.stepz: {type: int, low: 1, high: 5}}}\n", [],
        ["tune.search_space", "train.stepz"]),
    "search path without a field": (
        "tune: {search_space: {train: {type: int, low: 1, high: 5}}}\n", [],
        ["tune.search_space", "'train'"]),
    "search low >= high": (
        "tune: {search_space: {train.lr: {type: uniform, low: 0.5, high: 0.1}}}\n", [],
        ["tune.search_space.train.lr", "low"]),
    "search loguniform low == high": (
        "tune: {search_space: {train.lr: {type: loguniform, low: 0.01, high: 0.01}}}\n", [],
        ["tune.search_space.train.lr", "low"]),
    "unknown search dim type": (
        "tune: {search_space: {train.lr: {type: normal, low: 0, high: 1}}}\n", [],
        ["tune.search_space.train.lr", "normal"]),
    "pretrained tokenizer without path": ("tokenizer: {kind: pretrained}\n", [],
                                          ["tokenizer.path"]),
    "min_replicas > max_replicas": ("serve: {min_replicas: 3, max_replicas: 2}\n", [],
                                    ["serve.min_replicas", "serve.max_replicas"]),
    "bad value from an override": ("train: {steps: 10}\n", ["train.steps=ten"],
                                   ["train.steps", "'ten'"]),
    "override into a non-section": ("train: {steps: 5}\n", ["train.steps.x=1"],
                                    ["train.steps.x"]),
    "malformed override (no =)": ("train: {steps: 10}\n", ["train.steps"], ["train.steps"]),
}


@pytest.mark.parametrize(("body", "overrides", "expected"), FIELD_ERRORS.values(),
                         ids=FIELD_ERRORS.keys())
def test_spec_error_names_file_and_field(write_spec, body, overrides, expected):
    path = write_spec(body)
    message = spec_error(path, overrides)
    assert str(path) in message
    for text in expected:
        assert text in message


def test_yaml_syntax_error_names_file_and_line(write_spec):
    path = write_spec("train:\n  steps: 5\n  lr: [0.1,\n")
    message = spec_error(path)
    assert str(path) in message
    assert "invalid YAML" in message
    assert "line" in message


@pytest.mark.parametrize("body", ["- train\n- model\n", "just a string\n", "42\n"])
def test_spec_that_is_not_a_mapping_is_refused(write_spec, body):
    path = write_spec(body)
    message = spec_error(path)
    assert str(path) in message
    assert "mapping" in message


def test_missing_spec_file_is_named(tmp_path):
    path = tmp_path / "absent.yaml"
    message = spec_error(path)
    assert str(path) in message
    assert "cannot read" in message


def test_every_bad_field_is_reported_at_once(write_spec):
    path = write_spec("train: {steps: 0}\nmodel: {n_layer: 0}\n")
    lines = spec_error(path).splitlines()
    assert any("train.steps" in line for line in lines)
    assert any("model.n_layer" in line for line in lines)
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_search_dim_error_names_the_path_the_user_wrote(write_spec):
    # The user wrote tune.search_space["train.lr"].low; pydantic's discriminated union
    # inserts its tag ("loguniform") into the location, which the message must not show.
    path = write_spec(
        "tune: {search_space: {train.lr: {type: loguniform, low: -1, high: 0.1}}}\n")
    message = spec_error(path)
    assert str(path) in message
    assert "tune.search_space.train.lr.low" in message


def test_defaults_need_no_file():
    spec = load(None)
    assert spec.train.steps == 200
    assert spec.data.path is None


def test_default_spec_error_names_defaults():
    assert "<defaults>: train.steps" in spec_error(None, ["train.steps=0"])


# --- overrides -----------------------------------------------------------------------


def test_overrides_are_yaml_typed():
    parsed = parse_overrides(["train.steps=10", "train.lr=0.001", "train.use_gpu=true",
                              "train.betas=[0.8, 0.9]", "tracking.run_name=", "a.b=x=y"])
    assert parsed == {"train.steps": 10, "train.lr": 0.001, "train.use_gpu": True,
                      "train.betas": [0.8, 0.9], "tracking.run_name": "", "a.b": "x=y"}
    assert type(parsed["train.steps"]) is int


def test_overrides_apply_typed_values_over_the_file(write_spec):
    path = write_spec("train: {steps: 100, lr: 0.01, warmup_steps: 5}\n")
    spec = load(path, ["train.steps=10", "train.lr=1e-3", "train.use_gpu=true"])
    assert spec.train.steps == 10 and type(spec.train.steps) is int
    assert spec.train.lr == pytest.approx(1e-3) and type(spec.train.lr) is float
    assert spec.train.use_gpu is True
    assert spec.train.warmup_steps == 5  # untouched fields keep the file's values


def test_overrides_create_missing_sections(write_spec):
    path = write_spec("")
    spec = load(path, ["model.n_layer=2", "serve.port=9001", "tracking.experiment=exp1"])
    assert spec.model.n_layer == 2
    assert spec.serve.port == 9001
    assert spec.tracking.experiment == "exp1"


def test_override_sets_a_whole_search_space_mapping(write_spec):
    # Search-space keys contain dots themselves, so the space is overridden as one mapping.
    path = write_spec("tune: {enabled: true}\n")
    spec = load(path, ["tune.search_space={train.lr: {type: loguniform, low: 1e-4, high: 1e-2}}"])
    dim = spec.tune.search_space["train.lr"]
    assert (dim.type, dim.low, dim.high) == ("loguniform", 1e-4, 1e-2)


# --- derived values ------------------------------------------------------------------


def test_run_name_defaults_to_stem_and_timestamp(write_spec):
    spec = load(write_spec("{}\n", name="my-job.yaml"))
    assert re.fullmatch(r"my-job-\d{8}-\d{6}", spec.tracking.run_name)


def test_run_name_without_file_and_explicit_run_name(write_spec):
    assert re.fullmatch(r"lmforge-\d{8}-\d{6}", load(None).tracking.run_name)
    path = write_spec("tracking: {run_name: fixed}\n")
    assert load(path).tracking.run_name == "fixed"


def test_local_paths_become_absolute(tmp_path, write_spec):
    (tmp_path / "corpus.txt").write_text("some text\n")
    path = write_spec("data: {path: corpus.txt, cache_dir: cache}\n")
    spec = load(path)
    assert spec.data.path == str(tmp_path / "corpus.txt")
    assert spec.data.cache_dir == str(tmp_path / "cache")


def test_corpus_directory_and_glob_are_accepted(tmp_path, write_spec):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a\n")
    assert load(write_spec("data: {path: docs}\n")).data.path == str(tmp_path / "docs")
    assert load(write_spec("data: {path: 'docs/*.txt'}\n")).data.path.endswith("*.txt")
    (tmp_path / "empty").mkdir()
    assert "data.path" in spec_error(write_spec("data: {path: empty}\n"))


def test_with_values_applies_dotted_values_and_validates():
    spec = JobSpec()
    trial = spec.with_values({"train.lr": 0.005, "model.n_layer": 3})
    assert trial.train.lr == 0.005
    assert trial.model.n_layer == 3
    assert spec.train.lr == 1e-3 and spec.model.n_layer == 4  # the original is unchanged
    with pytest.raises(ValidationError, match="train.steps"):
        spec.with_values({"train.steps": 0})
    with pytest.raises(ValidationError, match="model.n_embd"):
        spec.with_values({"model.n_head": 3})


# --- CLI -----------------------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line(text: str) -> str:
    """Rich wraps long lines at the console width; compare with whitespace collapsed."""
    return " ".join(text.split())


def test_cli_validate_bad_spec_exits_2_naming_file_and_field(write_spec):
    write_spec("train: {steps: 0}\n", name="bad.yaml")
    result = cli("validate", "bad.yaml")
    assert result.exit_code == 2
    out = one_line(result.output)
    assert "bad.yaml" in out
    assert "train.steps" in out
    assert "greater than 0" in out


def test_cli_validate_bad_override_exits_2(write_spec):
    write_spec("train: {steps: 10, warmup_steps: 2}\n", name="good.yaml")
    result = cli("validate", "good.yaml", "model.n_head=3")
    assert result.exit_code == 2
    assert "model.n_embd" in one_line(result.output)


def test_cli_validate_good_spec_prints_the_resolved_spec(write_spec):
    write_spec("train: {steps: 10, warmup_steps: 2}\n", name="good.yaml")
    result = cli("validate", "good.yaml", "train.steps=20", "data.cache_dir=c")
    assert result.exit_code == 0, result.output
    dumped = json.loads(result.stdout.strip().splitlines()[-1])
    assert dumped["train"]["steps"] == 20
    assert dumped["train"]["warmup_steps"] == 2


def test_cli_help_mentions_overrides():
    top = cli("--help")
    assert top.exit_code == 0
    assert "overrides" in one_line(top.output)
    run = cli("run", "--help")
    assert run.exit_code == 0
    out = one_line(run.output)
    assert "overrides" in out.lower()
    assert "key.sub=value" in out


def test_module_entry_point_rejects_bad_spec_fast(tmp_path, write_spec):
    write_spec("model: {n_embd: 10, n_head: 3}\n", name="bad.yaml")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lmforge", "validate", "bad.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    err = one_line(proc.stderr)
    assert "bad.yaml" in err
    assert "model.n_embd" in err
    assert proc.stdout == ""
    assert elapsed < 15


def test_api_keys_never_leave_the_spec_object(tmp_path):
    """Keys reach the deployment (the object) but no dump: MLflow params, tags, validate."""
    spec = load(None, ["serve.api_keys=[s3cret]"])
    assert spec.serve.api_keys == ["s3cret"]
    assert "s3cret" not in spec.model_dump_json() and "s3cret" not in repr(spec)


@pytest.mark.parametrize("cpus,threads", [(0.5, 1), (0.9, 1), (1.0, 1), (1.5, 2), (1.9, 2),
                                          (8, 8)])
def test_worker_threads_round_the_reserved_cpus(cpus, threads):
    assert TrainConfig(cpus_per_worker=cpus).threads == threads


@pytest.mark.parametrize("name", ["../escape", "a/b", "-dash-first", ".hidden", "sp ace",
                                  "x" * 129, "naïve"])
def test_a_run_name_that_is_not_a_plain_directory_name_is_refused(name: str):
    with pytest.raises(SpecError, match=r"tracking\.run_name: must be letters, digits"):
        load(None, [f"tracking.run_name={name}"])


@pytest.mark.parametrize("name", ["run-1", "Run_2.b", "x" * 128])
def test_plain_run_names_are_accepted(name: str):
    assert load(None, [f"tracking.run_name={name}"]).tracking.run_name == name
