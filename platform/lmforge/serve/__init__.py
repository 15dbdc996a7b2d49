"""Serve stage: a Ray Serve deployment of an OpenAI-compatible completion endpoint.

`serving_app` (builder.py) builds the application for a model URI, the one way every
deployment path takes; `serve_app` is its import path for a cluster's Serve config.
"""

from lmforge.serve.app import build_app, deploy, pin_alias
from lmforge.serve.builder import serve_app, serving_app, with_secrets

__all__ = ["build_app", "deploy", "pin_alias", "serve_app", "serving_app", "with_secrets"]
