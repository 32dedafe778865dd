"""`PoolingEngine`: batches pooling requests (embed, classify, score, reward) through one jitted forward.

It answers the engine interface `AsyncLLMEngine` drives (`add_request`, `abort_request`, `step`,
`has_unfinished_requests`, `validate_request`, `requests`), so one thread owns the device and the
server's request handling (disconnects, engine death, per-request failures) is the generation path's.
Each `step()` runs one dense batch: waiting requests in arrival order, at most `max_num_seqs` rows and
`max_num_batched_tokens` padded tokens (a single longer request runs alone), padded right to a
power-of-two row count and length, so few shapes ever compile (`shapes()`: all of them, compiled at
start-up where the generation engine warms up too). A request finishes in its step.

Faults stay with their requests: a bad prompt or parameter is a ValueError at `add_request`; an
exception while turning one row into its output fails that request; an exception out of the forward
fails the requests of that batch (logged), and the engine takes the next batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_lib.encoders import PoolingModel
from serving.engine.engine import EngineConfig, _token_ids
from serving.engine.executables import make_room_for
from serving.engine.runner import bucket, buckets
from serving.engine.warmup import should_warm_up
from serving.pooling import SERVED_TASKS, PoolingParams, PoolingRequestOutput, PoolingTask, task_output

logger = logging.getLogger(__name__)
MIN_LENGTH = 8  # smallest padded length bucket


@dataclass
class _PoolingRequest:
    request_id: str
    prompt: str | None
    ids: list[int]
    params: PoolingParams


@nnx.jit(static_argnums=(1,))
def _forward(net: nnx.Module, kind: str, ids: jax.Array, mask: jax.Array, types: jax.Array) -> jax.Array:
    from model_lib.encoders.loading import task_outputs

    return task_outputs(net, kind, ids, mask, types)


class PoolingEngine:
    lora = None  # adapters are served for generation only (`LLM` refuses enable_lora here)
    spec = None  # nor is speculative decoding

    def __init__(self, model: PoolingModel, tokenizer: Any = None, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        if self.config.max_model_len is not None and self.config.max_model_len > model.max_tokens:
            raise ValueError(f"max_model_len={self.config.max_model_len} is longer than the model's "
                             f"{model.max_tokens} positions")
        limit = model.spec.max_seq_length or model.max_tokens
        self.max_model_len = min(self.config.max_model_len or limit, model.max_tokens)
        if self.config.max_num_seqs < 1 or self.config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.task = PoolingTask(model.task, model.spec.normalize, model.num_labels, model.multi_label)
        self.requests: OrderedDict[str, _PoolingRequest] = OrderedDict()
        self.num_prompt_tokens = 0
        self.compiled_shapes: set[tuple[int, int]] = set()  # (rows, length) batches run so far
        if should_warm_up(self.config.enforce_eager):
            self.warm_up()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The request tasks this model serves."""
        return SERVED_TASKS[self.model.task]

    # -- requests -------------------------------------------------------------
    def validate_request(self, prompt_ids: list[int], params: Any) -> None:
        """ValueError naming the problem for a request this engine will not serve."""
        if not isinstance(params, PoolingParams):
            raise ValueError(f"this model ({self.model.architecture}) is a pooling model: it serves "
                             f"{', '.join(self.tasks)}, not text generation")
        if params.task not in self.tasks:
            raise ValueError(f"this model ({self.model.architecture}) serves {', '.join(self.tasks)}, "
                             f"not {params.task!r}")
        if params.dimensions is not None:
            self.model.spec.check_dimensions(params.dimensions, self.model.hidden_size)
        if not prompt_ids:
            raise ValueError("the input is empty")
        vocab = self.model.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_ids):
            raise ValueError(f"input token ids must be integers in [0, {vocab})")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(f"the input is {len(prompt_ids)} tokens; this model's maximum input length is "
                             f"{self.max_model_len} tokens")
        types = params.token_type_ids
        if types is not None and (len(types) != len(prompt_ids)
                                  or any(t < 0 or t >= self.model.type_vocab_size for t in types)):
            raise ValueError(f"token_type_ids must give each input token a type in [0, {self.model.type_vocab_size})")

    def add_request(self, request_id: str, prompt_ids: list[int], params: PoolingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = _token_ids(prompt_ids)
        self.validate_request(prompt_ids, params)
        self.requests[request_id] = _PoolingRequest(request_id, prompt, prompt_ids, params)
        self.num_prompt_tokens += len(prompt_ids)

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_running(self) -> int:
        return 0  # nothing stays between steps

    def num_waiting(self) -> int:
        return len(self.requests)

    # -- the step -------------------------------------------------------------
    def _take_batch(self) -> list[_PoolingRequest]:
        batch: list[_PoolingRequest] = []
        longest = 0
        for request in self.requests.values():
            rows, length = self.batch_shape([max(longest, len(request.ids))] * (len(batch) + 1))
            if batch and (len(batch) + 1 > self.config.max_num_seqs or rows * length > self.config.max_num_batched_tokens):
                break
            batch.append(request)
            longest = max(longest, len(request.ids))
        for request in batch:
            del self.requests[request.request_id]
        return batch

    def batch_shape(self, lengths: list[int]) -> tuple[int, int]:
        """The padded `[rows, length]` a batch of inputs of these lengths runs as."""
        return bucket(len(lengths), 1, self.config.max_num_seqs), bucket(max(lengths), MIN_LENGTH, self.max_model_len)

    def shapes(self) -> list[tuple[int, int]]:
        """Every batch shape a step can run: each length bucket with the row buckets the budget allows."""
        budget, most = self.config.max_num_batched_tokens, self.config.max_num_seqs
        return [(rows, length) for length in buckets(MIN_LENGTH, self.max_model_len)
                for rows in buckets(1, most) if rows == 1 or rows * length <= budget]

    def _run(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        make_room_for(ids.shape, self.compiled_shapes)
        self.compiled_shapes.add(ids.shape)
        out = _forward(self.model.net, self.model.spec.kind, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
        return np.asarray(jax.device_get(out))

    def warm_up(self) -> None:
        """Compile every batch shape now, so that none compiles while serving."""
        for rows, length in self.shapes():
            zeros = np.zeros((rows, length), np.int32)
            self._run(zeros, np.ones_like(zeros), zeros)
        logger.info("pooling engine: compiled %d batch shapes", len(self.shapes()))

    def step(self) -> list[PoolingRequestOutput]:
        """Run the next batch of waiting requests; their outputs (each finished, or failed with `error`)."""
        batch = self._take_batch()
        if not batch:
            return []
        rows, length = self.batch_shape([len(r.ids) for r in batch])
        ids = np.full((rows, length), self.model.pad_token_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        types = np.zeros((rows, length), np.int32)
        for row, request in enumerate(batch):
            n = len(request.ids)
            ids[row, :n], mask[row, :n] = request.ids, 1
            if request.params.token_type_ids is not None:
                types[row, :n] = request.params.token_type_ids
        try:
            raw = self._run(ids, mask, types)
        except Exception as e:  # noqa: BLE001 - fails this batch's requests only
            logger.exception("pooling batch of %d requests failed", len(batch))
            return [self._failed(r, f"the request failed while running its batch: {e!r}") for r in batch]
        outputs = []
        for row, request in enumerate(batch):
            data = raw[row, : len(request.ids)] if raw.ndim == 3 else raw[row]
            try:
                result = task_output(self.task, request.params, data)
            except Exception as e:  # noqa: BLE001 - fails this request only
                logger.error("request %s failed while building its output", request.request_id, exc_info=e)
                outputs.append(self._failed(request, f"the request failed while building its output: {e!r}"))
                continue
            outputs.append(PoolingRequestOutput(request.request_id, request.ids, result, request.prompt))
        return outputs

    @staticmethod
    def _failed(request: _PoolingRequest, error: str) -> PoolingRequestOutput:
        return PoolingRequestOutput(request.request_id, request.ids, None, request.prompt, error=error)
