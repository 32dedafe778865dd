"""The OpenAI-compatible HTTP API (FastAPI) and the `serve` command."""
