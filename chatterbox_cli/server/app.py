"""The HTTP API, in OpenAI's shapes: POST /v1/audio/speech, GET /v1/models, GET /health.

Audio streams out as it is made (chunked transfer): the response starts with the first piece of audio
(the first chunk's early piece on a GPU), so its status is known before any byte is sent: a request that
fails before then gets an OpenAI-style JSON error with its status code. Errors are
{"error": {"message", "type", "param", "code"}}. With stream_format "sse" the same bytes come as OpenAI's
server-sent events: speech.audio.delta (base64), then one speech.audio.done with the usage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatterbox_cli import formats
from chatterbox_cli.errors import ChatterboxError, OutOfMemoryError, UsageError
from chatterbox_cli.languages import LANGUAGES, detect_language
from chatterbox_cli.pipeline import SAMPLE_RATE, SynthesisSettings, prepare_chunks
from chatterbox_cli.server.engine import Engine, Speech
from chatterbox_cli.server.limits import Limits

# Model names a client may send: ours, and OpenAI's speech models (all served by the one loaded model).
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


# OpenAI's fields this server has no use for, and why (a request with one is refused, not half-served)
UNSERVED = {
    "instructions": "instructions (gpt-4o-mini-tts's spoken style) has no counterpart in Chatterbox; leave "
    "it out, and steer the delivery with exaggeration and cfg_weight",
}


class SpeechBody(BaseModel):
    """OpenAI's /v1/audio/speech body, and Chatterbox's extras."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str
    voice: str
    response_format: Literal["wav", "mp3", "flac", "opus", "pcm"] = "mp3"  # OpenAI's default
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    language: str | None = None
    exaggeration: float | None = None
    cfg_weight: float | None = None
    temperature: float = 0.8
    seed: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status)
        if kind is None:
            kind = "server_error" if self.status >= 500 else "invalid_request_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def model_id(engine: Engine) -> str:
    return {"english": "chatterbox"}.get(engine.variant.name, f"chatterbox-{engine.variant.name}")


def check_origins(origins: Sequence[str]) -> list[str]:
    """The web origins allowed to call the API from a browser (CORS): `*`, or scheme://host[:port] each,
    as browsers send them; anything else is a UsageError, since it would never match."""
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise UsageError(
                f"--allow-origin {origin!r} is not an origin; give scheme://host[:port] as a browser sends "
                "it (http://localhost:3000, no path), or * for any"
            )
    return list(origins)


def create_app(
    engine: Engine, limits: Limits, api_key: str | None = None, allow_origins: Sequence[str] = ()
) -> FastAPI:
    app = FastAPI(title="chatterbox-cli", docs_url=None, redoc_url=None, openapi_url=None)
    if allow_origins:  # (checked: check_origins) browsers let pages from these call the API, preflight too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    in_flight = 0
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def not_allowed(request: Request, _: Exception) -> JSONResponse:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key"
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        holder = engine.holder
        return {
            "status": "ok",
            "model": model_id(engine),
            "variant": engine.variant.name,
            "preset": holder.decision.preset,
            "device": str(holder.decision.device),
            "reason": holder.decision.reason,
            "step_downs": list(holder.step_downs),
            "requests_in_flight": in_flight,
            "waiting": engine.waiting,
            "rounds": engine.rounds,
            "largest_group": engine.largest_group,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        owned = {"object": "model", "created": started, "owned_by": "resemble-ai"}
        return {"object": "list", "data": [{"id": model_id(engine), **owned}]}

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        nonlocal in_flight
        authorize(request)
        body = await read_body(request, limits.max_body_bytes)
        if in_flight >= limits.max_concurrent:
            raise ApiError(
                429, f"{in_flight} requests are in flight, the most this server takes; retry later"
            )
        in_flight += 1
        speech: Speech | None = None
        try:
            fmt, speech, queue = prepare(engine, limits, body)
            try:
                engine.submit(speech)
            except ChatterboxError as e:
                raise ApiError(503, str(e)) from e
            deadline = asyncio.get_running_loop().time() + limits.timeout_s
            first = await next_piece(queue, deadline, speech)
            if first is None:
                raise ApiError(500, "the model made no audio for this input")
        except BaseException:  # an error response, or the client gone before the first audio
            in_flight -= 1
            if speech is not None:
                speech.cancelled = True
            raise

        sse = body.stream_format == "sse"
        frame = audio_event if sse else bytes

        async def stream() -> AsyncIterator[bytes]:
            nonlocal in_flight
            encoder = formats.ChunkEncoder(fmt, SAMPLE_RATE)
            try:
                piece: np.ndarray | None = first
                while piece is not None:
                    data = encoder.write(piece)
                    if data:
                        yield frame(data)
                    piece = await next_piece(queue, deadline, speech)
                tail = encoder.close()
                if tail:
                    yield frame(tail)
                if sse:
                    yield event("speech.audio.done", usage=usage(speech))
            except ApiError:
                pass  # the status went out with the first piece: the stream ends short (sse: no "done")
            finally:
                speech.cancelled = True  # a client gone mid-stream frees its place in the rounds
                in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream" if sse else fmt.media_type)

    return app


def event(kind: str, **fields: object) -> bytes:
    """One server-sent event of OpenAI's speech stream (stream_format "sse")."""
    return b"data: " + json.dumps({"type": kind, **fields}).encode() + b"\n\n"


def audio_event(data: bytes) -> bytes:
    return event("speech.audio.delta", audio=base64.b64encode(data).decode("ascii"))


def usage(speech: Speech) -> dict[str, int]:
    """OpenAI's usage of a finished request: the text tokens T3 read and the speech tokens it made."""
    read, made = speech.text_tokens, speech.speech_tokens
    return {"input_tokens": read, "output_tokens": made, "total_tokens": read + made}


async def read_body(request: Request, limit: int) -> SpeechBody:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {declared} bytes; this server takes at most {limit}")
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise ApiError(413, f"the body is over {limit} bytes, the most this server takes")
    try:
        return SpeechBody.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not JSON: {e}") from e
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if param is None:  # the body as a whole: a list, a string, a number
            message = f"the body must be a JSON object of the request's fields ({first['msg']})"
            raise ApiError(400, message) from e
        raise ApiError(400, UNSERVED.get(param, f"{param}: {first['msg']}"), param=param) from e


def prepare(engine: Engine, limits: Limits, body: SpeechBody) -> tuple[formats.AudioFormat, Speech, Any]:
    """Check the request and make it a Speech for the engine, with the queue its audio arrives on."""
    if body.model not in (model_id(engine), *OPENAI_MODELS):
        names = ", ".join((model_id(engine), *OPENAI_MODELS))
        raise ApiError(
            404, f"model {body.model!r} is not served here; use one of {names}", "model", "model_not_found"
        )
    if body.speed != 1.0:
        raise ApiError(
            400,
            f"speed {body.speed} is not supported: this server has no time-stretch, and changing the "
            "speed any other way changes the voice; ask for speed 1.0",
            "speed",
        )
    text = body.input.strip()
    if not text:
        raise ApiError(400, "input is empty; give the text to speak", "input")
    if len(body.input) > limits.max_input_chars:
        raise ApiError(
            400,
            f"input has {len(body.input)} characters; this server takes at most {limits.max_input_chars}",
            "input",
        )
    try:
        fmt = formats.get_format(body.response_format)
        formats.check_encoder(fmt, SAMPLE_RATE)
        language = language_of(engine, body.language, text)
        settings = SynthesisSettings(
            exaggeration=body.exaggeration,
            cfg_weight=body.cfg_weight,
            temperature=body.temperature,
            seed=body.seed,
            language=language,
            max_tokens=limits.max_tokens,
        )
        ignored = settings.ignored_by(engine.variant)
        if ignored:
            names = ", ".join(name.removeprefix("--").replace("-", "_") for name in ignored)
            raise UsageError(f"the {engine.variant.name} model has no input for {names}; leave it out")
        voice_key, conds = engine.voice(body.voice)
        chunks, _ = prepare_chunks(engine.tokenizer.for_language(language), text, settings.chunk_tokens)
    except UsageError as e:
        raise ApiError(400, str(e)) from e
    queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def deliver(item: np.ndarray | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody listens
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return fmt, Speech(chunks, conds, voice_key, settings.with_seed(), deliver), queue


def language_of(engine: Engine, given: str | None, text: str) -> str:
    languages = engine.variant.languages
    if given is not None:
        code = given.lower()
        if code not in languages:
            raise UsageError(
                f"language {given!r} is not one the {engine.variant.name} model speaks "
                f"({', '.join(languages)})"
            )
        return code
    if len(languages) == 1:
        return languages[0]
    code = detect_language(text).code
    return code if code in languages and code in LANGUAGES else languages[0]


async def next_piece(queue: asyncio.Queue[Any], deadline: float, speech: Speech) -> np.ndarray | None:
    """The request's next piece of audio, None at its end; ApiError for an error or the time running out."""
    left = deadline - asyncio.get_running_loop().time()
    try:
        item = await asyncio.wait_for(queue.get(), timeout=max(left, 0.0))
    except asyncio.TimeoutError as e:
        speech.cancelled = True
        raise ApiError(504, "the request ran out of time (--timeout); try a shorter input") from e
    if isinstance(item, OutOfMemoryError):
        raise ApiError(503, f"out of GPU memory: {item}", code="out_of_memory")
    if isinstance(item, ChatterboxError):
        raise ApiError(400 if isinstance(item, UsageError) else 500, str(item))
    if isinstance(item, BaseException):
        raise ApiError(500, f"speaking failed: {type(item).__name__}: {item}")
    return item
