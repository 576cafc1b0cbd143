"""`cnnkit serve`: the web page and JSON API (see cnnkit.serve.app)."""

from cnnkit.serve.app import create_app, load_models, serve

__all__ = ["create_app", "load_models", "serve"]
