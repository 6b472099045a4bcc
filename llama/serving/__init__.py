"""Serving many requests at once.

    engine.py  continuous batching: one KV-cache row per request, one decode step for all of them
    app.py     an OpenAI-compatible HTTP API (FastAPI) over the engine (needs the `serve` extra)
"""
