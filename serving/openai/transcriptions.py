"""`POST /v1/audio/transcriptions` and `/v1/audio/translations` (OpenAI's shapes) for Whisper models.

A multipart form: `file` (WAV, FLAC, OGG or MP3; up to `AUDIO_UPLOAD_LIMIT` bytes, or `--max-body-size`
if larger), `model`, optional `language` (else detected per window on multilingual models), `prompt`,
`response_format` ("json": `{"text", "usage"}`; "text": the transcript alone), `temperature` in [0, 1]
and `stream` (OpenAI's `transcript.text.delta` / `transcript.text.done` server-sent events).
Timestamped formats (verbose_json, srt, vtt) are refused by name: no timestamps are generated.
Translations take no `language` (the source's is detected) and run Whisper's translate task (to English). The audio
decodes and its features are computed off the event loop; its 30 s windows run as one batch of engine
requests (`serving/audio/whisper.py`), and a client that disconnects aborts them.
"""

from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from serving.audio.whisper import WindowRequest, join_texts
from serving.openai.responses import sse
from serving.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serving.openai.app import OpenAIServer

TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
AUDIO_UPLOAD_LIMIT = 25 * 2**20  # OpenAI's cap on an audio file
FORM_OVERHEAD = 64 * 2**10  # multipart boundaries and the other fields
RESPONSE_FORMATS = ("json", "text")
TIMESTAMPED_FORMATS = ("verbose_json", "srt", "vtt")


def upload_limits(max_body_size: int) -> dict[str, int]:
    """Body caps by path for the upload routes (at least an OpenAI-sized audio file)."""
    return dict.fromkeys((TRANSCRIPTIONS, TRANSLATIONS), max(max_body_size, AUDIO_UPLOAD_LIMIT + FORM_OVERHEAD))


def _refused(status: int, message: str, param: str | None = None) -> Exception:
    """The app's `APIError` (imported here: the app module imports this one)."""
    from serving.openai.app import APIError

    return APIError(status, message, param=param)


class TranscriptionRoutes:
    def __init__(self, server: "OpenAIServer"):
        self.server = server
        self.transcriber = server.transcriber

    def prompts(self, requests: list[WindowRequest]) -> list:
        from serving.openai.app import Prompt

        return [Prompt(None, r.prompt_ids, encoder_features=r.features, token_masks=r.token_masks) for r in requests]

    async def run(self, raw: Request, requests: list[WindowRequest], params: SamplingParams, base_id: str) -> list:
        """The windows' outputs, in order; a request the engine refuses is a 400."""
        try:
            outputs = await self.server.collect(raw, self.prompts(requests), params, base_id)
        except ValueError as e:
            raise _refused(400, str(e)) from None
        return [outputs[i] for i in range(len(requests))]

    async def languages(self, raw: Request, features: list, language: str | None, base_id: str) -> list[int | None]:
        """Each window's language token: the one asked for, or the detected one."""
        transcriber = self.transcriber
        if transcriber.needs_detection(language):
            detections = [transcriber.detection_request(f) for f in features]
            outputs = await self.run(raw, detections, SamplingParams(temperature=0.0, max_tokens=1), f"{base_id}-lang")
            return [o.outputs[0].token_ids[0] for o in outputs]
        try:
            return transcriber.language_ids(language, len(features))
        except ValueError as e:
            raise _refused(400, str(e), param="language") from None

    async def transcriptions(
        self,
        raw: Request,
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0, ge=0.0, le=1.0),
        stream: bool = Form(False),
    ) -> Response:
        return await self.respond(raw, file, model, language, prompt, response_format, temperature, "transcribe",
                                  stream)

    async def translations(
        self,
        raw: Request,
        file: UploadFile = File(...),
        model: str = Form(...),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0, ge=0.0, le=1.0),
        stream: bool = Form(False),
    ) -> Response:
        return await self.respond(raw, file, model, None, prompt, response_format, temperature, "translate", stream)

    async def respond(self, raw: Request, file: UploadFile, model: str, language: str | None, prompt: str | None,
                      response_format: str, temperature: float, task: str, stream: bool) -> Response:
        server = self.server
        if server.check_model(model) is not None:
            raise _refused(400, "transcription runs on the base model, not a LoRA adapter", param="model")
        if response_format not in RESPONSE_FORMATS:
            why = " (no timestamps are generated)" if response_format in TIMESTAMPED_FORMATS else ""
            raise _refused(400, f"response_format {response_format!r} is not supported{why}; use "
                                f"{' or '.join(RESPONSE_FORMATS)}", param="response_format")
        data = await file.read()
        transcriber = self.transcriber

        def prepare():
            samples = transcriber.samples(data)
            return len(samples) / transcriber.sampling_rate, transcriber.features(samples)

        try:
            seconds, features = await server.off_loop(prepare)
        except ValueError as e:
            raise _refused(400, str(e), param="file") from None
        base_id = f"{task[:5]}-{uuid.uuid4().hex}"
        language_ids = await self.languages(raw, features, language, base_id)
        try:
            requests = transcriber.requests(features, language_ids, task, prompt)
        except ValueError as e:
            raise _refused(400, str(e), param="prompt") from None
        params = SamplingParams(temperature=temperature, max_tokens=None)
        if stream:
            return StreamingResponse(self.events(requests, params, base_id, seconds), media_type="text/event-stream")
        outputs = await self.run(raw, requests, params, base_id)
        text = join_texts([o.outputs[0].text for o in outputs])
        if response_format == "text":
            return PlainTextResponse(text)
        return JSONResponse({"text": text, "usage": _usage(seconds)})

    async def events(self, requests: list[WindowRequest], params: SamplingParams, base_id: str,
                     seconds: float) -> AsyncIterator[str]:
        """OpenAI's transcript stream: `transcript.text.delta` events in window order (each window's text
        stripped, windows joined by a space, so the deltas add up to the final text), then
        `transcript.text.done` with the whole text. A failure after the stream began is its last event."""
        texts, finished = [""] * len(requests), [False] * len(requests)
        window, sent, spoken = 0, "", False  # the window being sent, its text sent so far, text before it
        try:
            async for i, out in self.server.run(self.prompts(requests), params, base_id):
                texts[i] += out.outputs[0].text
                finished[i] = out.finished
                while window < len(requests):
                    visible = texts[window].strip()  # trailing spaces wait for more text, or vanish at the end
                    if len(visible) > len(sent):
                        gap = " " if spoken and not sent else ""
                        yield sse({"type": "transcript.text.delta", "delta": gap + visible[len(sent):]})
                        sent = visible
                    if not finished[window]:
                        break
                    spoken, window, sent = spoken or bool(sent), window + 1, ""
            yield sse({"type": "transcript.text.done", "text": join_texts(texts), "usage": _usage(seconds)})
        except Exception as e:  # noqa: BLE001 - the stream has begun: its status is sent
            yield sse(self.server.error_event(e))


def _usage(seconds: float) -> dict:
    return {"type": "duration", "seconds": math.ceil(seconds)}


def add_transcription_routes(app: FastAPI, server: "OpenAIServer", responses: dict) -> None:
    """Register `/v1/audio/transcriptions` and `/v1/audio/translations` (`responses`: the OpenAPI error
    declarations)."""
    routes = TranscriptionRoutes(server)
    app.post(TRANSCRIPTIONS, responses=responses)(routes.transcriptions)
    app.post(TRANSLATIONS, responses=responses)(routes.translations)
