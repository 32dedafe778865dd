"""An asyncio front end over `LLMEngine`, whose loop runs in one thread that owns the device.

Coroutines submit requests and abort them through a thread-safe inbox; the
engine thread drains the inbox between steps, runs steps while there is work,
and hands each request's outputs back to the event loop that asked. Leaving the
`generate` iterator early (a client that disconnects, a cancelled task) aborts
the request, which frees its KV pages before the next step.

A request the engine fails on its own (see `LLMEngine.step`) raises
`RequestFailedError` in its caller and nothing else. An exception out of a
step (the device failed) ends the loop: every waiting caller gets
`EngineDeadError`, `alive` turns false, `error` says why, and `on_death` runs
(the server uses it to exit non-zero, so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, TypeVar

import numpy as np

from serving.engine import LLMEngine
from serving.multimodal.inputs import ImageItem
from serving.outputs import RequestOutput
from serving.sampling_params import SamplingParams
from serving.structured.token_masks import TokenMasks

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down or crashed); no request can be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (an exception of its own); the engine goes on."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_death = on_death
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight, stop the loop and wait for the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set() and self._error is None

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine loop, if it crashed."""
        return self._error

    # -- requests -------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        images: list[ImageItem] | None = None,
        lora_name: str | None = None,
        encoder_features: np.ndarray | None = None,
        token_masks: TokenMasks | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it progresses (in `params.output_kind`), the last one `finished`.

        `images`, `lora_name`, `encoder_features`, `token_masks`: as `LLMEngine.add_request` takes them."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        audio = {} if encoder_features is None else {"encoder_features": encoder_features}  # not a pooling engine's
        self.engine.validate_request(prompt_ids, params, **audio)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        # Only the options a request uses: engines without images or adapters (pooling) take neither.
        given = {"images": images or None, "lora_name": lora_name or None, "encoder_features": encoder_features,
                 "token_masks": token_masks}
        options = {k: v for k, v in given.items() if v is not None}
        self._inbox.put(("add", ((request_id, prompt_ids, params, prompt), options)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True  # the engine already retired it
                    raise RequestFailedError(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def call(self, work: Callable[[], T]) -> T:
        """`work()` on the engine thread between two steps (what changes engine state, such as loading
        a LoRA adapter); its result, or its exception raised here."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", (work, future)))
        self._wake.set()
        return await future

    # -- the engine thread ----------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and not stream.loop.is_closed():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                args, options = payload
                request_id = args[0]
                if request_id not in self._streams:
                    continue  # the caller left before the engine saw the request
                try:
                    self.engine.add_request(*args, **options)
                except ValueError as e:
                    self._deliver(request_id, e)
                except Exception as e:  # noqa: BLE001 - fails this request only
                    logger.exception("request %s could not be added", request_id)
                    self._deliver(request_id, RequestFailedError(f"the request could not be added: {e!r}"))
            elif kind == "call":
                self._call(*payload)
            else:
                self.engine.abort_request(payload)

    def _refuse_calls(self, error: BaseException) -> None:
        """The loop ended: calls still queued get `error` instead of hanging."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                self._settle(payload[1], None, error)

    def _call(self, work: Callable[[], object], future: asyncio.Future) -> None:
        try:
            result, error = work(), None
        except Exception as e:  # noqa: BLE001 - handed to the caller
            result, error = None, e
        self._settle(future, result, error)

    @staticmethod
    def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
        loop = future.get_loop()
        if loop.is_closed():
            return

        def settle() -> None:
            if future.done():  # the caller was cancelled
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        loop.call_soon_threadsafe(settle)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output.request_id, output)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting caller
            logger.exception("engine loop crashed")
            self._error = e
        finally:
            error = EngineDeadError(f"the engine stopped: {self._error!r}" if self._error else "the server is shutting down")
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
            for request_id in list(self._streams):
                self._deliver(request_id, error)
            self._refuse_calls(error)
            if self._error is not None and self.on_death is not None:
                self.on_death(self._error)
