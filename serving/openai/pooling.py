"""The pooling routes: `POST /v1/embeddings` (OpenAI's shape), `/classify`, `/score` (`/v1/score`),
`/rerank` (`/v1/rerank`, `/v2/rerank`) and `/pooling` (vLLM's shapes).

Requests go through the same engine thread as generation (`AsyncLLMEngine` over a `PoolingEngine`, or
over `GenerationWithPooling` for a generative model that also embeds); a client that disconnects
aborts its requests. A route the served model has no task for (embeddings on
a generative model, classify on an embedding model) is a 400 naming what the model serves, as are
over-long inputs, `dimensions` on a model without Matryoshka training, and more than
`MAX_INPUTS` inputs.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import Field

from serving.async_engine import RequestFailedError
from serving.engine.combined import pooling_engine_of
from serving.engine.pooling_engine import PoolingEngine
from serving.openai.protocol import _Request
from serving.openai.responses import ResponseHeader
from serving.pooling import MAX_DIMENSIONS, PoolingInput, PoolingParams, PoolingRequestOutput, plan_scores

if TYPE_CHECKING:
    from serving.openai.app import OpenAIServer

MAX_INPUTS = 2048  # inputs per request (OpenAI's cap for embeddings), and documents per rerank
Inputs = str | list[str] | list[int] | list[list[int]]
# request bodies (OpenAPI component names) whose `model` the schema pins to the served one
POOLING_REQUESTS = ("EmbeddingRequest", "PoolingRequest", "ClassificationRequest", "ScoreRequest", "RerankRequest")


class EmbeddingRequest(_Request):
    model: str
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=MAX_DIMENSIONS)
    user: str | None = None


class PoolingRequest(_Request):
    model: str
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"


class ClassificationRequest(_Request):
    model: str
    input: Inputs


class ScoreRequest(_Request):
    model: str
    text_1: str | list[str]
    text_2: str | list[str]


class RerankRequest(_Request):
    model: str
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=0, le=MAX_INPUTS)


def _refused(status: int, message: str, param: str | None = None) -> Exception:
    """The app's `APIError` (imported here: the app module imports this one)."""
    from serving.openai.app import APIError

    return APIError(status, message, param=param)


def _encode(values: np.ndarray | list[float], encoding_format: str) -> list[Any] | str:
    """A float list, or OpenAI's base64 of little-endian float32 bytes."""
    array = np.asarray(values, np.float32)
    if encoding_format == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode()
    return array.tolist()


def _usage(outputs: list[PoolingRequestOutput]) -> dict[str, int]:
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


class PoolingRoutes:
    """Handlers of the pooling routes over an `OpenAIServer` (its engine, tokenizer, checks and errors)."""

    def __init__(self, server: "OpenAIServer"):
        self.server = server

    def engine(self, route: str) -> PoolingEngine:
        engine = pooling_engine_of(self.server.engine.engine)
        if engine is None:
            raise _refused(400, f"{route} needs a pooling model (an encoder, classifier or reward model); "
                                f"`{self.server.model_name}` generates text: use /v1/completions or /v1/chat/completions")
        return engine

    def inputs(self, body: Any, params: PoolingParams) -> list[PoolingInput]:
        """Tokenized inputs of a request (text or token ids, one or a list), each checked by the engine."""
        raw = body.input
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise _refused(400, "input is empty", param="input")
        if len(items) > MAX_INPUTS:
            raise _refused(400, f"{len(items)} inputs; at most {MAX_INPUTS} per request", param="input")
        return [(p.text, p.ids, params) for p in (self.server.prepare(item) for item in items)]

    def check(self, inputs: list[PoolingInput]) -> None:
        for _, ids, params in inputs:
            try:
                self.server.engine.engine.validate_request(ids, params)
            except ValueError as e:
                message = str(e)
                raise _refused(400, message, param="dimensions" if "dimensions" in message else "input") from None

    async def run(self, raw: Request, inputs: list[PoolingInput], base_id: str) -> list[PoolingRequestOutput]:
        """Every input's output, in order; aborts them all if the client leaves first."""
        self.check(inputs)

        async def one(i: int, item: PoolingInput) -> PoolingRequestOutput:
            text, ids, params = item
            timer = self.server.metrics.request(len(ids))
            result = None
            try:
                async for output in self.server.engine.generate(f"{base_id}-{i}", ids, params, text):
                    result = output  # a pooling request's one output is its last
            except RequestFailedError:
                timer.finished(["error"])
                raise
            if result is None:
                raise RequestFailedError("the engine returned no output")
            timer.finished(["stop"])
            return result

        async def every() -> list[PoolingRequestOutput]:
            return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(inputs))))

        return await self.server.until_done(raw, every())

    def check_base_model(self, name: str) -> None:
        """404 for a model not served; 400 for a LoRA adapter's name (adapters serve generation only)."""
        if self.server.check_model(name) is not None:
            raise _refused(400, f"`{name}` is a LoRA adapter; pooling routes serve the base model "
                                f"`{self.server.model_name}` only")

    async def pooled(self, raw: Request, body: Any, route: str, params: PoolingParams, prefix: str):
        engine = self.engine(route)
        if params.task not in engine.tasks:
            raise _refused(400, f"`{self.server.model_name}` ({engine.model.architecture}) serves "
                                f"{', '.join(engine.tasks)}; {route} needs {params.task}")
        self.check_base_model(body.model)
        inputs = await self.server.off_loop(lambda: self.inputs(body, params))
        header = ResponseHeader(f"{prefix}-{uuid.uuid4().hex}", self.server.model_name)
        return header, await self.run(raw, inputs, header.id)

    # -- routes ---------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest, raw: Request) -> dict[str, Any]:
        params = self.server.params(lambda: PoolingParams("embed", dimensions=body.dimensions))
        header, outputs = await self.pooled(raw, body, "/v1/embeddings", params, "embd")
        data = [{"index": i, "object": "embedding", "embedding": _encode(o.outputs.embedding, body.encoding_format)}
                for i, o in enumerate(outputs)]
        return header.wrap("list", data=data, usage=_usage(outputs))

    async def pooling(self, body: PoolingRequest, raw: Request) -> dict[str, Any]:
        header, outputs = await self.pooled(raw, body, "/pooling", PoolingParams("encode"), "pool")
        data = [{"index": i, "object": "pooling", "data": _encode(o.outputs.data, body.encoding_format)}
                for i, o in enumerate(outputs)]
        return header.wrap("list", data=data, usage=_usage(outputs))

    async def classify(self, body: ClassificationRequest, raw: Request) -> dict[str, Any]:
        header, outputs = await self.pooled(raw, body, "/classify", PoolingParams("classify"), "classify")
        labels = self.engine("/classify").model.id2label
        data = []
        for i, o in enumerate(outputs):
            probs = o.outputs.probs
            best = int(np.argmax(probs))
            label = labels[best] if best < len(labels) else f"LABEL_{best}"
            data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
        return header.wrap("list", data=data, usage=_usage(outputs))

    async def scores(self, raw: Request, body: Any, route: str, text_1: Any, text_2: Any) -> tuple[ResponseHeader, list]:
        model = self.engine(route).model
        self.check_base_model(body.model)
        count = 1 if isinstance(text_2, str) else len(text_2)
        if max(count, 1 if isinstance(text_1, str) else len(text_1)) > MAX_INPUTS:
            raise _refused(400, f"at most {MAX_INPUTS} texts on each side per request")
        try:
            plan = await self.server.off_loop(
                lambda: plan_scores(model.task, model.num_labels, model.type_vocab_size, self.server.tokenizer,
                                    text_1, text_2))
        except ValueError as e:
            raise _refused(400, str(e)) from None
        header = ResponseHeader(f"score-{uuid.uuid4().hex}", self.server.model_name)
        return header, plan.scores(await self.run(raw, plan.inputs, header.id))

    async def score(self, body: ScoreRequest, raw: Request) -> dict[str, Any]:
        header, outputs = await self.scores(raw, body, "/score", body.text_1, body.text_2)
        data = [{"index": i, "object": "score", "score": o.outputs.score} for i, o in enumerate(outputs)]
        return header.wrap("list", data=data, usage=_usage(outputs))

    async def rerank(self, body: RerankRequest, raw: Request) -> dict[str, Any]:
        if not body.documents:
            raise _refused(400, "documents is empty", param="documents")
        header, outputs = await self.scores(raw, body, "/rerank", body.query, body.documents)
        ranked = sorted(range(len(outputs)), key=lambda i: -outputs[i].outputs.score)
        top = ranked[: body.top_n] if body.top_n else ranked
        results = [{"index": i, "document": {"text": body.documents[i]}, "relevance_score": outputs[i].outputs.score}
                   for i in top]
        return {"id": header.id.replace("score", "rerank"), "model": header.model,
                "usage": {"total_tokens": _usage(outputs)["total_tokens"]}, "results": results}


# Paths outside /v1 that `--api-key` guards too (vLLM leaves them open; they run the model as /v1 does).
GUARDED_PATHS = ("/pooling", "/classify", "/score", "/rerank", "/v2/rerank")


def add_pooling_routes(app: FastAPI, server: "OpenAIServer", responses: dict) -> None:
    """Register the pooling routes on the server's app (`responses`: the OpenAPI error declarations)."""
    routes = PoolingRoutes(server)
    app.post("/v1/embeddings", responses=responses)(routes.embeddings)
    app.post("/pooling", responses=responses)(routes.pooling)
    app.post("/classify", responses=responses)(routes.classify)
    for path in ("/score", "/v1/score"):
        app.post(path, responses=responses)(routes.score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path, responses=responses)(routes.rerank)
