"""The one way to build lmforge's serving application for a model.

`serving_app(model_uri, cfg, tracking_uri)` is what `lmforge serve`, the pipeline's serve
check and `serve_app` (the import path a cluster's Serve config names: `serve run`,
`serve deploy`, the KubeRay RayService) all call, so the endpoint is the same however it is
deployed. Secrets are read from the environment here, and nowhere else: the API keys in
`LMFORGE_API_KEYS` (comma-separated) join `serve.api_keys`, so they need not sit in a spec
file, a command line or a Serve config.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from ray.serve import Application

from lmforge.config import ServeConfig, check_api_keys, load, resolve_tracking_uri
from lmforge.registry import LoadedModel, load_model
from lmforge.serve.app import build_app, pin_alias

API_KEYS_ENV = "LMFORGE_API_KEYS"


def with_secrets(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with the API keys from $LMFORGE_API_KEYS added (a copy; `cfg` is unchanged).
    Whitespace around each key is dropped; an empty key (`a,,b`, a trailing comma, or the
    variable set to nothing) is a ValueError naming the variable, not a key that matches
    `Bearer ` or a silent lack of auth. Unset: no keys added."""
    raw = os.environ.get(API_KEYS_ENV)
    if raw is None:
        return cfg
    keys = [k.strip() for k in raw.split(",")]
    try:
        check_api_keys(keys)
    except ValueError as e:
        raise ValueError(f"${API_KEYS_ENV}: {e} (unset it for no keys)") from None
    return cfg.model_copy(update={"api_keys": [*cfg.api_keys, *keys]})


def serving_app(model_uri: str, cfg: ServeConfig, tracking_uri: str,
                loader: Callable[[str], LoadedModel] | None = None) -> Application:
    """The Serve application answering for `model_uri` with `cfg`'s settings and API keys
    (the spec's and the environment's). `models:/NAME@ALIAS` is pinned to its version at
    start and followed as the alias moves. `loader` replaces the registry loader (tests
    inject a tiny model)."""
    loader = loader or functools.partial(load_model, tracking_uri=tracking_uri)
    return build_app(loader, with_secrets(cfg), model_uri,
                     functools.partial(pin_alias, tracking_uri=tracking_uri))


def serve_app(args: dict[str, str]) -> Application:
    """Application builder for a cluster's Serve config (`import_path: lmforge.serve:serve_app`
    in a KubeRay RayService's serveConfigV2, `serve deploy`, or
    `serve run lmforge.serve:serve_app model_uri=models:/NAME@champion`).

    args: `model_uri` (required), optional `spec` (a job spec whose serve and tracking
    sections apply), optional `tracking_uri` (default: the spec's, then
    $MLFLOW_TRACKING_URI). Every other `serve.KEY` arg overrides that serve setting, as on
    `lmforge serve`'s command line.
    """
    if "model_uri" not in args:
        raise ValueError("serve_app: args.model_uri is required (e.g. models:/NAME@champion)")
    overrides = [f"{k}={v}" for k, v in args.items() if k.startswith("serve.")]
    job = load(Path(args["spec"]) if args.get("spec") else None, overrides)
    uri = args.get("tracking_uri") or resolve_tracking_uri(job.tracking, Path("runs"))
    return serving_app(args["model_uri"], job.serve, uri)
