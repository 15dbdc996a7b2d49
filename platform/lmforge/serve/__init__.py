"""Serve stage: Ray Serve deployment of an OpenAI-compatible completion endpoint."""

from lmforge.serve.app import build_app, deploy, pin_alias

__all__ = ["build_app", "deploy", "pin_alias"]
