"""The offline pooling methods of `LLM` (vLLM's names): `embed`, `classify`, `score`, `reward`, `encode`.

Each adds its requests to the engine together and steps it until all have finished, so they batch as
the server's do; outputs come back in input order. Bad inputs raise ValueError before anything runs;
a request the engine fails comes back with `error` set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from serving.engine.combined import pooling_engine_of
from serving.engine.pooling_engine import PoolingEngine
from serving.pooling import PoolingInput, PoolingParams, PoolingRequestOutput, plan_scores


class PoolingMethods:
    """Mixed into `LLM`; needs its `engine`, `tokenizer`, `_prompt_ids` and `_check_leader`."""

    engine: Any
    tokenizer: Any

    def _pooling_engine(self, task: str) -> PoolingEngine:
        engine = pooling_engine_of(self.engine)
        if engine is None:
            raise ValueError(f"{task} needs a pooling model (an encoder, classifier or reward model); "
                             f"{getattr(self, 'model_path', 'this model')} generates text (LLM(..., "
                             "enable_embeddings=True) also serves its embeddings)")
        return engine

    def _run_pooling(self, inputs: list[PoolingInput]) -> list[PoolingRequestOutput]:
        self._check_leader()
        engine = self._pooling_engine(inputs[0][2].task if inputs else "pooling")
        for _, ids, params in inputs:
            engine.validate_request(ids, params)
        ids_of = []
        try:
            for text, ids, params in inputs:
                request_id = f"pool-{self._counter}"
                self._counter += 1
                engine.add_request(request_id, ids, params, prompt=text)
                ids_of.append(request_id)
            finished: dict[str, PoolingRequestOutput] = {}
            while len(finished) < len(ids_of):
                for output in engine.step():
                    finished[output.request_id] = output
        except BaseException:
            for request_id in ids_of:
                engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in ids_of]

    def _pool_prompts(self, prompts: Any, params: PoolingParams) -> list[PoolingRequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return self._run_pooling([(*self._prompt_ids(p), params) for p in prompts])

    def encode(self, prompts: Any, pooling_params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        """The model's own pooled output per prompt (`outputs.data`: what `/pooling` returns)."""
        return self._pool_prompts(prompts, pooling_params or PoolingParams("encode"))

    def embed(self, prompts: Any, pooling_params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        """One embedding per prompt (`outputs.embedding`); `PoolingParams(dimensions=..., normalize=...)`."""
        params = dataclasses.replace(pooling_params or PoolingParams(), task="embed")
        return self._pool_prompts(prompts, params)

    def classify(self, prompts: Any) -> list[PoolingRequestOutput]:
        """Class probabilities per prompt (`outputs.probs`)."""
        return self._pool_prompts(prompts, PoolingParams("classify"))

    def reward(self, prompts: Any) -> list[PoolingRequestOutput]:
        """A reward model's per-token outputs (`outputs.data`, `[tokens, labels]`)."""
        return self._pool_prompts(prompts, PoolingParams("reward"))

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[PoolingRequestOutput]:
        """Relevance of each (data_1, data_2) pair (`outputs.score`): 1 -> N or N -> N texts. A cross-encoder
        gives its sigmoid probability of the pair, an embedding model the cosine similarity of the two
        texts' embeddings (`serving.pooling.ScorePlan`)."""
        model = self._pooling_engine("score").model
        plan = plan_scores(model.task, model.num_labels, model.type_vocab_size, self.tokenizer, data_1, data_2)
        return plan.scores(self._run_pooling(plan.inputs))
