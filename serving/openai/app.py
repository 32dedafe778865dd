"""The OpenAI-compatible FastAPI app: /v1/models, /v1/completions, /v1/chat/completions,
/v1/audio/transcriptions (Whisper), /health and /metrics.

Every error is an OpenAI error object with a status the OpenAPI document
declares: 400 for a body that is not JSON (or not UTF-8, or nested too deeply),
bad parameters and prompts that do not fit the context; 401 for a missing or
wrong API key; 404 for an unknown model or path; 405 for a wrong method; 413
for a body over `max_body_size`; 500 for a request the engine failed (the
engine goes on); 503 once the engine has stopped. Tokenization and chat
templates run on a worker thread, never on the event loop. A client that goes
away (streaming or not) aborts its requests, so their KV pages return to the
pool; the API-key check is a pure ASGI middleware, which keeps disconnects
visible to the endpoints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from serving.beam_search import BeamSearch, BeamSearchParams
from serving.metrics import ServingMetrics
from serving.engine.pooling_engine import PoolingEngine
from serving.openai.pooling import GUARDED_PATHS, POOLING_REQUESTS, add_pooling_routes
from serving.openai.lora_routes import adapter_cards, add_lora_routes
from serving.openai.transcriptions import add_transcription_routes, upload_limits
from serving.audio.whisper import Transcriber
from serving.multimodal.chat import count_images, split_images
from serving.multimodal.inputs import ImageInputs, ImageItem
from serving.multimodal.media import MediaFetcher
from serving.openai.chat_output import ChatTools, ChoiceStream, assistant_message, finish_reason
from serving.openai.protocol import ChatCompletionRequest, CompletionRequest
from serving.openai.reasoning import REASONING_PARSERS, ReasoningParser
from serving.openai.responses import (
    ErrorResponse,
    ResponseHeader,
    StreamCursor,
    chat_logprobs,
    completion_logprobs,
    error_body,
    sse,
    usage,
)
from serving.outputs import RequestOutput
from serving.sampling_params import RequestOutputKind, SamplingParams


logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_BODY_SIZE = 4 * 2**20  # bytes
ERROR_KINDS = {401: "authentication_error", 404: "NotFoundError", 500: "server_error", 503: "server_error"}
# What the OpenAPI document declares for each kind of route (FastAPI's 422 is never sent).
GENERATION_ERRORS = (400, 401, 404, 413, 500, 503)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ERROR_KINDS.get(status, "invalid_request_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.status, self.param), status_code=self.status)


def as_api_error(e: Exception) -> APIError:
    """The error object for an exception out of a generation (also sent as a stream's last event)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e))
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {e!r}")


def _declared(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": "an OpenAI error object"} for status in statuses}


def _parse_error_message(e: StarletteHTTPException) -> str:
    """FastAPI's generic body-parsing 400, with the reason it chains."""
    cause = e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply"
    return f"could not parse the body: {cause!r}" if cause else str(e.detail)


class BodyLimitMiddleware:
    """Pure ASGI: a body over `max_body_size` bytes gets 413 without being read in full.

    A declared Content-Length over the cap is refused before reading; otherwise
    the body is counted as it streams in, and the read that crosses the cap
    raises the 413 (an OpenAI error object, through the app's handlers).
    """

    def __init__(self, app: ASGIApp, max_body_size: int, path_limits: dict[str, int] | None = None):
        """`path_limits`: larger caps for upload routes (audio files), by path."""
        self.app = app
        self.max_body_size = max_body_size
        self.path_limits = path_limits or {}

    @staticmethod
    def too_large(limit: int) -> APIError:
        return APIError(413, f"the request body is larger than {limit} bytes (--max-body-size)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.max_body_size)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self.too_large(limit).response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, self.too_large(limit).message)
            return message

        await self.app(scope, counted, send)


class APIKeyMiddleware:
    """Pure ASGI: requests to the protected paths need 'Authorization: Bearer KEY' (compared in constant time).

    Unlike a Starlette BaseHTTPMiddleware it passes `receive` through untouched,
    so an endpoint still sees the client disconnect.
    """

    def __init__(self, app: ASGIApp, api_key: str, protected: tuple[str, ...]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "Missing or invalid API key (send 'Authorization: Bearer <key>')."
                await APIError(401, message).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class Prompt:
    text: str | None
    ids: list[int]
    images: list[ImageItem] = field(default_factory=list)  # placeholders already expanded in `ids`
    encoder_features: Any = None  # Whisper: one window's log-mel features (`ids` is the decoder's prompt)
    token_masks: Any = None  # what its tokens keep to (serving/structured/token_masks.py)


class ClientGone(Exception):
    pass


class OpenAIServer:
    """Request handling shared by the endpoints; `app()` builds the FastAPI application."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        tokenizer: Any,
        model_name: str,
        api_key: str | None = None,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        protect_metrics: bool = False,
        allow_runtime_lora_updating: bool = False,
        image_inputs: ImageInputs | None = None,
        media: MediaFetcher | None = None,
        enable_auto_tool_choice: bool = False,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        transcriber: Transcriber | None = None,
    ):
        """`allow_runtime_lora_updating`: add vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`
        (an engine with LoRA enabled only). `image_inputs`: a vision-language model's image preprocessing
        (chat image parts are refused without it); `media`: how image URLs are fetched (default: data: and
        http(s) only). `enable_auto_tool_choice` with a `tool_call_parser` (a `TOOL_PARSERS` name) reads tool
        calls out of the model's text for tool_choice "auto"; `reasoning_parser` (a `REASONING_PARSERS` name)
        splits `reasoning_content` from chat answers. `transcriber`: a Whisper model's audio requests
        (`/v1/audio/transcriptions`)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_size = max_body_size
        self.protect_metrics = protect_metrics
        self.lora = engine.engine.lora  # served adapters (None: LoRA off)
        self.allow_runtime_lora_updating = allow_runtime_lora_updating and self.lora is not None
        self.image_inputs = image_inputs
        self.transcriber = transcriber
        self.media = media or MediaFetcher()
        self.metrics = ServingMetrics(engine.engine, model_name)
        self.max_model_len = engine.engine.max_model_len
        self.max_n = engine.engine.config.limits.max_n
        self.tools = ChatTools(enable_auto_tool_choice, tool_call_parser)
        self.reasoning: ReasoningParser | None = None
        if reasoning_parser is not None:
            if reasoning_parser not in REASONING_PARSERS:
                raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}")
            self.reasoning = REASONING_PARSERS[reasoning_parser]
        # One worker: a fast tokenizer must not be used by two threads at once (its padding state is shared).
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="jaxllm-tokenize")

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run tokenizer work on the tokenizing thread, so the event loop keeps serving."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    # -- checks ---------------------------------------------------------------
    def check_generates(self) -> None:
        """A 400 for a generation route on a pooling model, naming what it serves."""
        engine = self.engine.engine
        if isinstance(engine, PoolingEngine):
            raise APIError(400, f"`{self.model_name}` ({engine.model.architecture}) is a pooling model: it serves "
                                f"{', '.join(engine.tasks)} (/v1/embeddings, /classify, /score, /rerank, /pooling), "
                                "not text generation")

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter that `name` selects (None: the base model); 404 for a model not served."""
        if name == self.model_name:
            return None
        if self.lora is not None and name in self.lora.adapters:
            return name
        served = ", ".join(f"`{n}`" for n in [self.model_name, *(self.lora.adapters if self.lora else ())])
        raise APIError(404, f"The model `{name}` does not exist; this server serves {served}.", "NotFoundError", "model")

    def decode(self, token: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token])

    def prepare(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> Prompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            return Prompt(prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return Prompt(None, list(prompt))

    def params(self, make: Callable[[], T]) -> T:
        """`make()`, its ValueError a 400."""
        try:
            return make()
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def check_count(self, num_prompts: int, params: SamplingParams) -> None:
        if num_prompts * params.n > self.max_n:
            raise APIError(
                400, f"the request asks for {num_prompts} prompt(s) x n={params.n} completions; "
                f"at most {self.max_n} per request (--max-n)", param="n"
            )

    def check_fits(self, prompts: list[Prompt], params: SamplingParams) -> None:
        self.check_count(len(prompts), params)
        for prompt in prompts:
            try:
                self.engine.engine.validate_request(prompt.ids, params)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt" if "prompt" in str(e) else None) from None
            used = self.engine.engine.context_tokens(prompt.ids)  # an encoder-decoder's source does not count
            wanted = used + (params.max_tokens or 0)
            if wanted > self.max_model_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens; the request needs "
                    f"{wanted} ({used} in the prompt, {params.max_tokens} to generate).",
                    param="max_tokens",
                )

    @staticmethod
    def error_event(e: Exception) -> dict[str, Any]:
        error = as_api_error(e)
        if error.status >= 500:
            logger.error("request failed: %s", error.message)
        return error_body(error.message, error.kind, error.status, error.param)

    # -- running requests -----------------------------------------------------
    async def run(self, prompts: list[Prompt], params: SamplingParams, base_id: str,
                  lora_name: str | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of all prompts interleaved as (prompt index, DELTA output): no per-step copies of what was sent;
        `lora_name`: the LoRA adapter they run with."""
        inbox: asyncio.Queue = asyncio.Queue()
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)

        async def pump(i: int, prompt: Prompt) -> None:
            timer = self.metrics.request(len(prompt.ids))
            finished = False
            try:
                inputs = {"images": prompt.images} if prompt.images else {}
                if prompt.encoder_features is not None:
                    inputs |= {"encoder_features": prompt.encoder_features, "token_masks": prompt.token_masks}
                async for out in self.engine.generate(f"{base_id}-{i}", prompt.ids, params, prompt.text,
                                                      lora_name=lora_name, **inputs):
                    timer.tokens_seen(sum(len(c.token_ids) for c in out.outputs))
                    if out.finished:
                        finished = True
                        timer.finished([c.finish_reason for c in out.outputs])
                    inbox.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                if isinstance(e, RequestFailedError):
                    finished = True
                    timer.finished(["error"] * params.n)
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

    async def collect(self, raw: Request, prompts: list[Prompt], params: SamplingParams, base_id: str,
                      lora_name: str | None = None) -> dict[int, RequestOutput]:
        """Whole outputs (the deltas added up); aborts everything if the client disconnects first."""

        async def gather() -> dict[int, RequestOutput]:
            whole: dict[int, RequestOutput] = {}
            async for i, out in self.run(prompts, params, base_id, lora_name):
                if i in whole:
                    whole[i].add(out)
                else:
                    whole[i] = out
            return whole

        return await self.until_done(raw, gather())

    async def until_done(self, raw: Request, work: Awaitable[T]) -> T:
        """`work`'s result; cancels it (aborting its requests) and raises ClientGone if the client leaves first."""
        task = asyncio.ensure_future(work)
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
        self.check_generates()
        lora = self.check_model(body.model)
        params = self.params(lambda: body.sampling_params(body.max_tokens, body.logprobs))
        self.check_count(len(body.prompts()), params)  # before tokenizing them all
        prompts = await self.off_loop(lambda: [self.prepare(p) for p in body.prompts()])
        await self.off_loop(lambda: self.check_fits(prompts, params))  # compiles the grammar, if any
        header = ResponseHeader(f"cmpl-{uuid.uuid4().hex}", body.model)

        def echo_text(p: Prompt) -> str:
            return p.text if p.text is not None else self.tokenizer.decode(p.ids)

        echo = await self.off_loop(lambda: [echo_text(p) if body.echo and self.tokenizer else "" for p in prompts])
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if body.use_beam_search:
            return await self.beam_completions(body, raw, prompts, params, header, echo, lora)

        def choice(i: int, c, text: str, tokens: list[int], entries, finish: str | None, offset: int) -> dict[str, Any]:
            return {
                "index": i * params.n + c.index,
                "text": text,
                "logprobs": None if entries is None else completion_logprobs(tokens, entries, self.decode, offset),
                "finish_reason": finish,
            }

        if not body.stream:
            final = await self.collect(raw, prompts, params, header.id, lora)
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
                async for i, out in self.run(prompts, params, header.id, lora):
                    for c in out.outputs:
                        cursor = cursors.setdefault((i, c.index), StreamCursor())
                        if cursor.done:
                            continue
                        offset, text = cursor.advance(c), c.text
                        if not cursor.started:
                            text, cursor.started = echo[i] + text, True
                        if not (text or c.token_ids or cursor.done):
                            continue
                        completion_tokens += len(c.token_ids)
                        yield sse(header.wrap("text_completion", choices=[choice(i, c, text, c.token_ids, c.logprobs, c.finish_reason, offset)]))
                if include_usage:
                    yield sse(header.wrap("text_completion", choices=[], usage=usage(prompt_tokens, completion_tokens)))
            except Exception as e:  # noqa: BLE001 - the stream has begun: its status is sent
                yield sse(self.error_event(e))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def beam_search(self, raw: Request, prompts: list[Prompt], params: SamplingParams, length_penalty: float,
                          temperature: float | None, base_id: str, lora: str | None) -> list[list[tuple[list[int], str]]]:
        """`use_beam_search`: each prompt's `params.n` best beams, best first, as (output tokens, finish reason)."""
        engine = self.engine.engine
        if getattr(engine, "seq2seq", None) is not None:
            raise APIError(400, "use_beam_search on encoder-decoders runs offline only (LLM.beam_search)")
        search_params = BeamSearchParams(beam_width=params.n, max_tokens=params.max_tokens or 1,
                                         ignore_eos=params.ignore_eos,
                                         temperature=temperature if temperature is not None else 0.0,
                                         length_penalty=length_penalty)
        self.params(lambda: search_params.validate(engine.config.limits.max_logprobs))
        search = BeamSearch([p.ids for p in prompts], search_params, tuple(engine.eos_token_ids), self.max_model_len)
        while beams := search.next_round():
            outputs = await self.collect(raw, [Prompt(None, tokens) for _, tokens in beams], search.step,
                                         f"{base_id}-{search.rounds}", lora)
            search.advance([outputs[i] for i in range(len(beams))])
        return [[(beam.tokens[len(prompt.ids):], beam.finish_reason) for beam in result.sequences]
                for prompt, result in zip(prompts, search.results())]

    async def beam_text(self, tokens: list[int]) -> str:
        return await self.off_loop(lambda: self.tokenizer.decode(tokens, skip_special_tokens=True)
                                   if self.tokenizer else "")

    async def beam_completions(self, body: CompletionRequest, raw: Request, prompts: list[Prompt],
                               params: SamplingParams, header: ResponseHeader, echo: list[str],
                               lora: str | None) -> Response:
        """`use_beam_search` on /v1/completions: each prompt's `n` best beams as its choices (vLLM's shape)."""
        found = await self.beam_search(raw, prompts, params, body.length_penalty, body.temperature, header.id, lora)
        choices, completion_tokens = [], 0
        for i, beams in enumerate(found):
            for j, (tokens, finish) in enumerate(beams):
                completion_tokens += len(tokens)
                choices.append({"index": i * params.n + j, "text": echo[i] + await self.beam_text(tokens),
                                "logprobs": None, "finish_reason": finish})
        prompt_tokens = sum(len(p.ids) for p in prompts)
        return JSONResponse(header.wrap("text_completion", choices=choices, usage=usage(prompt_tokens, completion_tokens)))

    # -- /v1/chat/completions -------------------------------------------------
    def chat_prompt(self, body: ChatCompletionRequest) -> Prompt:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        images: list = []
        if any(m.has_images for m in body.messages):
            messages, images = self.chat_images(body)
        else:
            messages = [m.template_message() for m in body.messages]
        tools = body.template_tools()
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                                      **({"tools": tools} if tools else {}))
        except jinja2.TemplateError as e:
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        # The template already holds any BOS; do not add special tokens twice.
        prompt = self.prepare(self.image_inputs.prompt_text(text) if images else text, add_special_tokens=False)
        if images:
            try:
                prompt.ids, prompt.images = self.image_inputs(prompt.ids, images)
            except ValueError as e:  # an undecodable image, placeholders that do not pair up
                raise APIError(400, str(e), param="messages") from None
        return prompt

    def chat_images(self, body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[bytes]]:
        """The template's messages and the images' bytes (counted against the limit before any is fetched)."""
        if self.image_inputs is None:
            raise APIError(400, f"the model `{self.model_name}` takes no images", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            self.image_inputs.check_count(count_images(messages))
            return split_images(messages, self.media.fetch)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Response:
        self.check_generates()
        lora = self.check_model(body.model)
        top_n = body.top_logprobs or 0
        params = self.params(lambda: body.sampling_params(body.token_limit(), top_n if body.logprobs else None))
        tool_parser = self.params(lambda: self.tools.parser(body))
        forced_name = body.named_tool() is not None
        # A grammar holds from the first token: there is no reasoning section before it for a parser that
        # assumes the prompt opened one (deepseek_r1); a parser that reads the output's own tags still applies.
        reasoning = self.reasoning
        if reasoning is not None and reasoning.starts_in_reasoning and params.structured_outputs is not None:
            reasoning = None
        prompt = await self.off_loop(lambda: self.chat_prompt(body))
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - len(prompt.ids))
        await self.off_loop(lambda: self.check_fits([prompt], params))  # compiles the grammar, if any
        header = ResponseHeader(f"chatcmpl-{uuid.uuid4().hex}", body.model)

        def logprobs(tokens: list[int], entries) -> dict[str, Any] | None:
            return None if entries is None else chat_logprobs(tokens, entries, self.decode, top_n)

        if body.use_beam_search:  # the n best beams as the choices, best first
            [found] = await self.beam_search(raw, [prompt], params, body.length_penalty, body.temperature, header.id, lora)
            choices = []
            for j, (tokens, finish) in enumerate(found):
                message = assistant_message(await self.beam_text(tokens), reasoning, tool_parser)
                choices.append({"index": j, "message": message, "logprobs": None,
                                "finish_reason": finish_reason(finish, "tool_calls" in message, forced_name)})
            completion_tokens = sum(len(tokens) for tokens, _ in found)
            return JSONResponse(header.wrap("chat.completion", choices=choices, usage=usage(len(prompt.ids), completion_tokens)))
        if not body.stream:
            final = (await self.collect(raw, [prompt], params, header.id, lora))[0]
            choices = []
            for c in final.outputs:
                message = assistant_message(c.text, reasoning, tool_parser)
                choices.append({
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs(c.token_ids, c.logprobs),
                    "finish_reason": finish_reason(c.finish_reason, "tool_calls" in message, forced_name),
                })
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            return JSONResponse(header.wrap("chat.completion", choices=choices, usage=usage(len(prompt.ids), completion_tokens)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            cursors: dict[int, StreamCursor] = {}
            streams: dict[int, ChoiceStream] = {}
            completion_tokens = 0

            def chunk(index: int, delta: dict[str, Any], entries: dict[str, Any] | None = None,
                      finish: str | None = None) -> str:
                choice = {"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish}
                return sse(header.wrap("chat.completion.chunk", choices=[choice]))

            try:
                async for _, out in self.run([prompt], params, header.id, lora):
                    for c in out.outputs:
                        cursor = cursors.setdefault(c.index, StreamCursor())
                        if cursor.done:
                            continue
                        if not cursor.started:
                            cursor.started = True
                            streams[c.index] = ChoiceStream(reasoning, tool_parser)
                            yield chunk(c.index, {"role": "assistant", "content": ""})
                        cursor.advance(c)
                        if not (c.text or c.token_ids or cursor.done):
                            continue
                        completion_tokens += len(c.token_ids)
                        stream = streams[c.index]
                        deltas = stream.feed(c.text, cursor.done) or [{}]
                        for delta in deltas[:-1]:
                            yield chunk(c.index, delta)
                        reason = finish_reason(c.finish_reason, stream.called, forced_name)
                        yield chunk(c.index, deltas[-1], logprobs(c.token_ids, c.logprobs), reason)
                if include_usage:
                    yield sse(header.wrap("chat.completion.chunk", choices=[], usage=usage(len(prompt.ids), completion_tokens)))
            except Exception as e:  # noqa: BLE001 - the stream has begun: its status is sent
                yield sse(self.error_event(e))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- the application ------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="jaxllm OpenAI-compatible server")
        app.add_middleware(BodyLimitMiddleware, max_body_size=self.max_body_size,
                           path_limits=upload_limits(self.max_body_size) if self.transcriber is not None else None)
        if self.api_key is not None:  # added last: the outermost
            # Checked before the body is read, so a bad key is a 401 whatever else is wrong.
            protected = ("/v1", *GUARDED_PATHS, *(("/metrics",) if self.protect_metrics else ()))
            app.add_middleware(APIKeyMiddleware, api_key=self.api_key, protected=protected)

        @app.exception_handler(APIError)
        async def _api_error(_: Request, e: APIError) -> JSONResponse:
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
            problems = []
            for err in e.errors():
                where = ".".join(str(part) for part in err.get("loc", ())[1:] if _is_field(part)) or "body"
                message = str(err["ctx"]["error"]) if err.get("type") == "value_error" else err.get("msg")
                problems.append(message if where == "body" else f"{where}: {message}")
            return APIError(400, "; ".join(problems)).response()

        @app.exception_handler(StarletteHTTPException)
        async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
            # FastAPI's body-parsing 400, the body limit's 413, routing's 404 and 405.
            message = _parse_error_message(e) if e.status_code == 400 else str(e.detail)
            response = APIError(e.status_code, message).response()
            response.headers.update(e.headers or {})
            return response

        @app.exception_handler(ClientGone)
        async def _gone(_: Request, __: ClientGone) -> Response:
            return Response(status_code=499)

        @app.exception_handler(RequestFailedError)
        @app.exception_handler(EngineDeadError)
        async def _engine(_: Request, e: Exception) -> JSONResponse:
            error = as_api_error(e)
            logger.error("request failed: %s", error.message)
            return error.response()

        @app.exception_handler(Exception)
        async def _unexpected(_: Request, e: Exception) -> JSONResponse:
            logger.exception("request failed")
            return APIError(500, f"internal error: {e!r}").response()

        @app.get("/health", response_class=Response, responses=_declared(503))
        async def health() -> Response:
            if self.engine.alive:
                return Response(status_code=200)
            error = self.engine.error
            return APIError(503, f"the engine stopped: {error!r}" if error else "the engine is not running").response()

        @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, **_declared(401)})
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", responses=_declared(401))
        async def models() -> dict[str, Any]:
            card = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "jaxllm", "max_model_len": self.max_model_len}
            return {"object": "list", "data": [card, *adapter_cards(self.lora, card)]}

        generation = {**_declared(*GENERATION_ERRORS), 200: {"content": {"application/json": {}, "text/event-stream": {}}}}
        if self.allow_runtime_lora_updating:
            add_lora_routes(app, self.engine, self.model_name)

        @app.post("/v1/completions", responses=generation)
        async def completions(body: CompletionRequest, raw: Request) -> Response:
            return await self.completions(body, raw)

        @app.post("/v1/chat/completions", responses=generation)
        async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
            return await self.chat(body, raw)

        add_pooling_routes(app, self, _declared(*GENERATION_ERRORS))
        if self.transcriber is not None:
            add_transcription_routes(app, self, _declared(*GENERATION_ERRORS))

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
                for operations in schema.get("paths", {}).values():
                    for operation in operations.values():
                        operation.get("responses", {}).pop("422", None)  # validation errors are 400s
                components = schema.get("components", {}).get("schemas", {})
                for name in ("HTTPValidationError", "ValidationError"):
                    components.pop(name, None)
                for name in ("CompletionRequest", "ChatCompletionRequest", *POOLING_REQUESTS):  # the one model name served
                    if self.lora is None:  # adapters' names come and go
                        components[name]["properties"]["model"]["enum"] = [self.model_name]
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi
        return app


def _is_field(part: Any) -> bool:
    """A location part that names a field or an index, not one of pydantic's union branches."""
    return isinstance(part, int) or (isinstance(part, str) and part.isidentifier() and part not in _UNION_TAGS)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
