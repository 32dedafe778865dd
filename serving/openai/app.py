"""The OpenAI-compatible FastAPI app: /v1/models, /v1/completions, /v1/chat/completions,
/health and /metrics.

Errors are OpenAI error objects: 400 for malformed JSON, bad parameters and
prompts that do not fit the context; 401 for a missing or wrong API key; 404 for
an unknown model. A client that goes away (streaming or not) aborts its
requests, so their KV pages return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.async_engine import AsyncLLMEngine, EngineDeadError
from serving.metrics import ServingMetrics
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest
from serving.openai.responses import (
    ResponseHeader,
    StreamCursor,
    chat_logprobs,
    completion_logprobs,
    error_body,
    sse,
    usage,
)
from serving.outputs import RequestOutput
from serving.sampling_params import SamplingParams


logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Prompt:
    text: str | None
    ids: list[int]


class ClientGone(Exception):
    pass


class OpenAIServer:
    """Request handling shared by the endpoints; `app()` builds the FastAPI application."""

    def __init__(self, engine: AsyncLLMEngine, tokenizer: Any, model_name: str, api_key: str | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = ServingMetrics(engine.engine, model_name)
        self.max_model_len = engine.engine.max_model_len

    # -- checks ---------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.", "NotFoundError", "model")

    def decode(self, token: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token])

    def prepare(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> Prompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            return Prompt(prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return Prompt(None, list(prompt))

    def params(self, make: Any) -> SamplingParams:
        try:
            return make()
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def check_fits(self, prompts: list[Prompt], params: SamplingParams) -> None:
        for prompt in prompts:
            try:
                self.engine.engine.validate_prompt(prompt.ids)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            wanted = len(prompt.ids) + (params.max_tokens or 0)
            if wanted > self.max_model_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens; the request needs "
                    f"{wanted} ({len(prompt.ids)} in the prompt, {params.max_tokens} to generate).",
                    param="max_tokens",
                )

    # -- running requests -----------------------------------------------------
    async def run(self, prompts: list[Prompt], params: SamplingParams, base_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all prompts interleaved as (prompt index, cumulative output)."""
        inbox: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: Prompt) -> None:
            timer = self.metrics.request(len(prompt.ids))
            finished = False
            try:
                async for out in self.engine.generate(f"{base_id}-{i}", prompt.ids, params, prompt.text):
                    timer.tokens_seen(sum(len(c.token_ids) for c in out.outputs))
                    if out.finished:
                        finished = True
                        timer.finished([c.finish_reason for c in out.outputs])
                    inbox.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                inbox.put_nowait((i, e))
            finally:
                if not finished:
                    timer.finished(["abort"] * params.n)
                inbox.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await inbox.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, raw: Request, prompts: list[Prompt], params: SamplingParams, base_id: str) -> dict[int, RequestOutput]:
        """Final outputs; aborts everything if the client disconnects first."""

        async def gather() -> dict[int, RequestOutput]:
            final = {}
            async for i, out in self.run(prompts, params, base_id):
                if out.finished:
                    final[i] = out
            return final

        task = asyncio.create_task(gather())
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientGone()

    # -- /v1/completions ------------------------------------------------------
    async def completions(self, body: CompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        params = self.params(lambda: body.sampling_params(body.max_tokens, body.logprobs))
        prompts = [self.prepare(p) for p in body.prompts()]
        self.check_fits(prompts, params)
        header = ResponseHeader(f"cmpl-{uuid.uuid4().hex}", self.model_name)
        echo = [(p.text if p.text is not None else self.tokenizer.decode(p.ids)) if body.echo and self.tokenizer else "" for p in prompts]
        prompt_tokens = sum(len(p.ids) for p in prompts)

        def choice(i: int, c, text: str, tokens: list[int], entries, finish: str | None, offset: int) -> dict[str, Any]:
            return {
                "index": i * params.n + c.index,
                "text": text,
                "logprobs": None if entries is None else completion_logprobs(tokens, entries, self.decode, offset),
                "finish_reason": finish,
            }

        if not body.stream:
            final = await self.collect(raw, prompts, params, header.id)
            choices = [
                choice(i, c, echo[i] + c.text, c.token_ids, c.logprobs, c.finish_reason, len(echo[i]))
                for i in sorted(final)
                for c in final[i].outputs
            ]
            completion_tokens = sum(len(c.token_ids) for out in final.values() for c in out.outputs)
            return JSONResponse(header.wrap("text_completion", choices=choices, usage=usage(prompt_tokens, completion_tokens)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            cursors: dict[tuple[int, int], StreamCursor] = {}
            completion_tokens = 0
            try:
                async for i, out in self.run(prompts, params, header.id):
                    for c in out.outputs:
                        cursor = cursors.setdefault((i, c.index), StreamCursor())
                        if cursor.done:
                            continue
                        offset = cursor.text_len
                        text, tokens, entries = cursor.advance(c)
                        if not cursor.started:
                            text, cursor.started = echo[i] + text, True
                        cursor.done = c.finish_reason is not None
                        if not (text or tokens or cursor.done):
                            continue
                        completion_tokens += len(tokens)
                        yield sse(header.wrap("text_completion", choices=[choice(i, c, text, tokens, entries, c.finish_reason, offset)]))
                if include_usage:
                    yield sse(header.wrap("text_completion", choices=[], usage=usage(prompt_tokens, completion_tokens)))
            except (ValueError, EngineDeadError) as e:
                yield sse(error_body(str(e), "server_error", 500))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- /v1/chat/completions -------------------------------------------------
    def chat_prompt(self, body: ChatCompletionRequest) -> Prompt:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt)
        # The template already holds any BOS; do not add special tokens twice.
        return self.prepare(text, add_special_tokens=False)

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(body.model)
        top_n = body.top_logprobs or 0
        params = self.params(lambda: body.sampling_params(body.token_limit(), top_n if body.logprobs else None))
        prompt = self.chat_prompt(body)
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - len(prompt.ids))
        self.check_fits([prompt], params)
        header = ResponseHeader(f"chatcmpl-{uuid.uuid4().hex}", self.model_name)

        def logprobs(tokens: list[int], entries) -> dict[str, Any] | None:
            return None if entries is None else chat_logprobs(tokens, entries, self.decode, top_n)

        if not body.stream:
            final = (await self.collect(raw, [prompt], params, header.id))[0]
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs(c.token_ids, c.logprobs),
                    "finish_reason": c.finish_reason,
                }
                for c in final.outputs
            ]
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            return JSONResponse(header.wrap("chat.completion", choices=choices, usage=usage(len(prompt.ids), completion_tokens)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            cursors: dict[int, StreamCursor] = {}
            completion_tokens = 0
            try:
                async for _, out in self.run([prompt], params, header.id):
                    for c in out.outputs:
                        cursor = cursors.setdefault(c.index, StreamCursor())
                        if cursor.done:
                            continue
                        if not cursor.started:
                            cursor.started = True
                            first = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                            yield sse(header.wrap("chat.completion.chunk", choices=[first]))
                        text, tokens, entries = cursor.advance(c)
                        cursor.done = c.finish_reason is not None
                        if not (text or tokens or cursor.done):
                            continue
                        completion_tokens += len(tokens)
                        delta = {"content": text} if text else {}
                        chunk = {"index": c.index, "delta": delta, "logprobs": logprobs(tokens, entries), "finish_reason": c.finish_reason}
                        yield sse(header.wrap("chat.completion.chunk", choices=[chunk]))
                if include_usage:
                    yield sse(header.wrap("chat.completion.chunk", choices=[], usage=usage(len(prompt.ids), completion_tokens)))
            except (ValueError, EngineDeadError) as e:
                yield sse(error_body(str(e), "server_error", 500))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- the application ------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="jaxllm OpenAI-compatible server")

        @app.middleware("http")
        async def authorize(request: Request, call_next):
            # Checked before the body is read, so a bad key is a 401 whatever else is wrong.
            if self.api_key is not None and request.url.path.startswith("/v1"):
                if request.headers.get("authorization") != f"Bearer {self.api_key}":
                    message = "Missing or invalid API key (send 'Authorization: Bearer <key>')."
                    return JSONResponse(error_body(message, "authentication_error", 401), status_code=401)
            return await call_next(request)

        @app.exception_handler(APIError)
        async def _api_error(_: Request, e: APIError) -> JSONResponse:
            return JSONResponse(error_body(e.message, e.kind, e.status, e.param), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
            problems = []
            for err in e.errors():
                where = ".".join(str(part) for part in err.get("loc", ())[1:]) or "body"
                problems.append(f"{where}: {err.get('msg')}")
            return JSONResponse(error_body("; ".join(problems), "invalid_request_error", 400), status_code=400)

        @app.exception_handler(ClientGone)
        async def _gone(_: Request, __: ClientGone) -> Response:
            return Response(status_code=499)

        @app.exception_handler(Exception)
        async def _unexpected(_: Request, e: Exception) -> JSONResponse:
            logger.exception("request failed")
            return JSONResponse(error_body(f"internal error: {e!r}", "server_error", 500), status_code=500)

        @app.exception_handler(EngineDeadError)
        async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
            return JSONResponse(error_body(str(e), "server_error", 503), status_code=503)

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.engine.alive else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            card = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "jaxllm", "max_model_len": self.max_model_len}
            return {"object": "list", "data": [card]}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, raw: Request) -> Response:
            return await self.completions(body, raw)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
            return await self.chat(body, raw)

        return app
