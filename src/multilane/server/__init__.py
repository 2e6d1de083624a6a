"""HTTP server: OpenAI- and Ollama-compatible routes, pipeline runs and metrics over a Runtime."""

from multilane.server.app import create_app, serve

__all__ = ["create_app", "serve"]
