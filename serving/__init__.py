"""Serving: engine, offline LLM API and the OpenAI-compatible server (serving issue)."""
