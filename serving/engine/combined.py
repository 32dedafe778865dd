"""`GenerationWithPooling`: a generative model that also serves embeddings, on one engine thread.

Opt-in (`LLM(..., enable_embeddings=True)`, `serve --enable-embeddings`): pooling requests
(`PoolingParams`) go to a `PoolingEngine` over the same loaded model (`decoder_pooling_model`: the
last token's final hidden state, normalised), generation requests to the `LLMEngine`. Each `step()`
runs the generation step, then one pooling batch, so neither kind waits for the other's queue to
drain: a generation step is delayed by at most one pooling batch (bounded by
`max_num_batched_tokens`), and a pooling batch by one generation step. Faults stay per request in
each engine, as there.
"""

from __future__ import annotations

from collections import ChainMap
from typing import Any

from serving.engine.engine import LLMEngine
from serving.engine.pooling_engine import PoolingEngine
from serving.pooling import PoolingParams


class GenerationWithPooling:
    def __init__(self, generation: LLMEngine, pooling: PoolingEngine):
        self.generation = generation
        self.pooling = pooling

    def __getattr__(self, name: str) -> Any:
        # Sizes, limits, pages and scheduler (the server and metrics read them) are the generation engine's.
        return getattr(self.generation, name)

    @property
    def requests(self) -> ChainMap:
        return ChainMap(self.generation.requests, self.pooling.requests)

    def _for(self, params: Any) -> LLMEngine | PoolingEngine:
        return self.pooling if isinstance(params, PoolingParams) else self.generation

    def validate_request(self, prompt_ids: list[int], params: Any) -> None:
        self._for(params).validate_request(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: Any, prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._for(params).add_request(request_id, prompt_ids, params, prompt)

    def abort_request(self, request_id: str) -> None:
        self.generation.abort_request(request_id)
        self.pooling.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.generation.has_unfinished_requests() or self.pooling.has_unfinished_requests()

    def num_waiting(self) -> int:
        return self.generation.num_waiting() + self.pooling.num_waiting()

    def step(self) -> list[Any]:
        """One generation step (if any is running or waiting), then one pooling batch (if any waits)."""
        outputs = self.generation.step() if self.generation.has_unfinished_requests() else []
        return outputs + self.pooling.step()


def pooling_engine_of(engine: Any) -> PoolingEngine | None:
    """The engine's pooling part: itself, a combined engine's, or None for a generation-only engine."""
    if isinstance(engine, PoolingEngine):
        return engine
    return engine.pooling if isinstance(engine, GenerationWithPooling) else None
