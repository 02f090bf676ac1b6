"""Serving: a continuous-batching engine (engine.py) behind an OpenAI-compatible HTTP API (api.py)."""
