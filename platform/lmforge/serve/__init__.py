"""Serve stage: Ray Serve deployment of an OpenAI-compatible completion endpoint."""

from lmforge.serve.app import build_app, deploy

__all__ = ["build_app", "deploy"]
