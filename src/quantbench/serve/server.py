"""An OpenAI-compatible HTTP server for one model (``quantbench serve``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent
events in OpenAI's chunk format, ending ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``.

One model, one worker: requests are checked and tokenized in the HTTP handlers, then handed to a single
generation thread that runs the generation loop continuously (:class:`quantbench.serve.generate.Generator`):
between two decode steps, new requests join the running batch (up to ``max_batch`` sequences) and finished
or cancelled ones leave it. At most ``max_queue`` requests are waiting or running; more are refused at once
with 503 (and a ``Retry-After`` header), so a burst never exhausts memory or crashes the process. Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: malformed
JSON, wrong or missing fields, unsupported options and prompts longer than the context (or
``max_prompt_tokens``) are 400, an unknown model 404, a body over ``max_body_bytes`` 413, a full queue 503.

Hostile input stays with its request: every field is type- and range-checked at the door (strict types: no
``true`` for an integer, no ``"5"`` for a number, no NaN; seeds within 0..2**63-1), bodies are read up to a
size cap, tokenizing runs off the event loop (a huge prompt cannot stall ``/health``), and a request whose
prompt makes the generator fail is failed alone (prompts that failed together are prefilled again one by
one); a failing decode step fails the requests running at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from quantbench.serve.generate import GenerationError, Generator, SamplingParams, Sequence

log = logging.getLogger("quantbench.serve")

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as vLLM does; wrong types are 400)


class _Body(BaseModel):
    # strict: a JSON `true` is not the integer 1, "5" is not a number (OpenAI answers both with 400).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: benchmarks use it


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# The generation worker


@dataclass
class Job:
    """One HTTP request: its sequences (n choices x prompts) and how to tell the handler what happened.

    The worker thread calls :meth:`seq_done` as each sequence finishes and :meth:`end` once (when all are
    done, or with the exception that failed one of them); both hand the news to the event loop."""

    seqs: list[Sequence]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue | None = (
        None  # streaming: ("text", index, piece), ("done", index, None), ("end", ...)
    )
    done: asyncio.Future | None = None  # non-streaming: set to None or the exception when the job ends
    cancelled: bool = False
    ended: bool = False  # worker-thread side
    finished: int = 0  # worker-thread side

    def send(self, event: tuple) -> None:
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def seq_done(self, index: int) -> None:
        seq = self.seqs[index]
        if seq.finish_reason == "error":
            self.end(seq.error or RuntimeError("generation failed"))
            return
        self.send(("done", index, None))
        self.finished += 1
        if self.finished == len(self.seqs):
            self.end(None)

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        if error is not None:
            self.cancelled = True  # its other sequences stop too

        def _set() -> None:
            if self.done is not None and not self.done.done():
                self.done.set_result(error)
            if self.events is not None:
                self.events.put_nowait(("end", -1, error))

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


class QueueFull(Exception):
    pass


class Worker:
    """The generation thread: takes :class:`Job` objects from a bounded queue into the generator's loop and
    steps the loop while anything runs (requests join and leave between steps)."""

    IDLE_WAIT_S = 0.5

    def __init__(self, generator: Generator, max_queue: int = 64, max_batch: int = 8) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be >= 1")
        self.generator = generator
        self.max_queue = max_queue
        self.max_batch = max_batch
        generator.scheduler.set_max_running(max_batch)
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: list[Job] = []  # started, not ended (worker thread only)
        self.pending = 0  # queued + running jobs
        self.stats = {"requests": 0, "refused": 0, "sequences": 0, "errors": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="quantbench-generate", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        loop = self.generator.scheduler.stats
        return {
            **self.stats,
            "running": len(self.generator.scheduler.running),
            "batches": loop["prefills"],
            "steps": loop["steps"],
        }

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending >= self.max_queue:
                self.stats["refused"] += 1
                raise QueueFull
            self.pending += 1
            self.stats["requests"] += 1
        self._inbox.put(job)

    def close(self, timeout: float = 10.0) -> None:
        self._inbox.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        scheduler = self.generator.scheduler
        while True:
            try:
                idle = not self._jobs and not scheduler.busy
                job = self._inbox.get(timeout=self.IDLE_WAIT_S) if idle else self._inbox.get_nowait()
            except queue.Empty:
                job = False
            if job is None:
                return
            if job is not False:
                self._start(job)
                continue  # take every queued job before the next step
            try:
                if scheduler.busy:
                    self.generator.step()
            except Exception:  # noqa: BLE001 - never let the worker thread die
                log.exception("worker error")
            self._reap()

    def _start(self, job: Job) -> None:
        """Hand a job's sequences to the loop; a job the generator refuses fails alone, at once."""
        if job.cancelled:
            self._ended(job)
            return
        try:
            for seq in job.seqs:
                self.generator.check_sequence(seq)
        except Exception as exc:  # noqa: BLE001 - answered as this request's error
            job.end(exc)
            self._ended(job)
            return
        self._jobs.append(job)
        self.stats["sequences"] += len(job.seqs)
        for seq in job.seqs:
            self.generator.submit(seq)

    def _reap(self) -> None:
        for job in [j for j in self._jobs if j.ended]:
            self._jobs.remove(job)
            if any(s.finish_reason == "error" for s in job.seqs):
                self.stats["errors"] += 1
            self.stats["tokens"] += sum(len(s.token_ids) for s in job.seqs)
            self._ended(job)

    def _ended(self, job: Job) -> None:
        with self._lock:
            self.pending -= 1


# ---------------------------------------------------------------------------------------------------------


@dataclass
class ServeSettings:
    model_name: str
    max_queue: int = 64
    max_batch: int = 64
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 256  # chat requests without max_tokens (completions default to 16, as OpenAI)
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = err.get("loc", ())
    param = str(loc[0]) if loc else None  # the top-level field (OpenAI's `param`)
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    where = where.split(".str")[0].split(".list[")[0] or param  # drop pydantic's union-branch names
    if err.get("type") == "missing":
        return f"'{where}' is a required property", param
    return f"invalid value for '{where}': {err.get('msg')}", param


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(raw: bytes) -> Any:
    return json.loads(raw, parse_constant=_reject_constant)


def create_app(generator: Generator, settings: ServeSettings, worker: Worker | None = None):
    """The FastAPI application serving ``generator`` under the name ``settings.model_name``."""
    worker = worker or Worker(generator, settings.max_queue, settings.max_batch)
    created = int(time.time())
    context = generator.context_length
    prompt_limit = min(context - 1, settings.max_prompt_tokens or context)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="quantbench", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.state.generator = generator
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(
            APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(), 500
        )

    expected_auth = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    def check_auth(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected_auth):  # constant time: no key prefix leaks by timing
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes ``max_body_bytes`` (never buffered beyond that)."""
        limit = settings.max_body_bytes
        too_big = APIError(
            413,
            f"request body larger than {limit} bytes (the server's --max-body-bytes)",
            param=None,
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def off_loop(fn, *args):
        """Tokenizer work runs in a thread: a long prompt never stalls the event loop (/health, streams)."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "quantbench"}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        body = {
            "status": "ok" if ok else "worker stopped",
            "model": settings.model_name,
            "pending": worker.pending,
            "max_queue": worker.max_queue,
            "path": generator.path,
            **worker.health(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        if model_id != settings.model_name:
            raise APIError(
                404, f"The model '{model_id}' does not exist", "not_found_error", "model", "model_not_found"
            )
        return model_card()

    async def parse(request: Request, cls: type[_Body]) -> Any:
        check_auth(request)
        raw = await read_body(request)
        try:
            data = await off_loop(_loads, raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise APIError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            body = cls.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, param=param) from None
        if body.model != settings.model_name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server has '{settings.model_name}'",
                "not_found_error",
                "model",
                "model_not_found",
            )
        unsupported = [
            name
            for name, bad in (
                ("presence_penalty", body.presence_penalty != 0),
                ("frequency_penalty", body.frequency_penalty != 0),
                ("logit_bias", bool(body.logit_bias)),
                ("logprobs", bool(getattr(body, "logprobs", None))),
                ("echo", bool(getattr(body, "echo", False))),
                ("best_of", getattr(body, "best_of", None) not in (None, 1)),
                ("suffix", bool(getattr(body, "suffix", None))),
                ("tools", bool(getattr(body, "tools", None))),
            )
            if bad
        ]
        if unsupported:
            raise APIError(400, f"'{unsupported[0]}' is not supported by this server", param=unsupported[0])
        return body

    def sampling(body: _Body, prompt_len: int, max_tokens: int | None, default: int) -> SamplingParams:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"'stop' takes up to {MAX_STOP} non-empty strings", param="stop")
        if prompt_len > prompt_limit:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this server accepts at most {prompt_limit} "
                f"(model context {context})",
                param="prompt" if isinstance(body, CompletionBody) else "messages",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = max(1, min(default, context - prompt_len))
        if prompt_len + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens; the prompt has {prompt_len} and max_tokens asks "
                f"{max_tokens} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(stops),
            ignore_eos=body.ignore_eos,
        )

    def submit(prompts: list[list[int]], params: list[SamplingParams], n: int, stream: bool) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(seqs=[], loop=loop)
        if stream:
            job.events = asyncio.Queue()
        else:
            job.done = loop.create_future()
        for p, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            for j in range(n):
                index = p * n + j
                seed = None if sp.seed is None else (sp.seed + j) % (MAX_SEED + 1)
                seq = Sequence(ids, dataclasses.replace(sp, seed=seed))
                if stream:
                    seq.on_text = lambda piece, i=index: job.send(("text", i, piece))
                seq.on_finish = lambda _seq, i=index: job.seq_done(i)
                seq.is_cancelled = lambda: job.cancelled
                job.seqs.append(seq)
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(
                503,
                f"server busy: {worker.max_queue} requests are already queued; retry later",
                "server_overloaded",
                code="queue_full",
            ) from None
        return job

    async def wait(job: Job) -> None:
        try:
            error = await asyncio.shield(job.done)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if error is not None:
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")

    def usage(job: Job, prompts: list[list[int]]) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(s.token_ids) for s in job.seqs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def stream_events(
        job: Job, make_chunk, first_chunks: list[dict[str, Any]], final_usage: dict | None, prompts
    ) -> AsyncIterator[bytes]:
        try:
            for chunk in first_chunks:
                yield _sse(chunk)
            while True:
                kind, index, payload = await job.events.get()
                if kind == "text":
                    yield _sse(make_chunk(index, payload, None))
                elif kind == "done":
                    yield _sse(make_chunk(index, None, _finish(job.seqs[index])))
                elif kind == "end":
                    if payload is not None:
                        err = APIError(
                            500, f"generation failed: {type(payload).__name__}: {payload}", "server_error"
                        )
                        yield _sse(err.body())
                        break
                    if final_usage is not None:
                        yield _sse({**make_chunk(0, None, None), "choices": [], "usage": usage(job, prompts)})
                    break
            yield _sse("[DONE]")
        finally:
            job.cancelled = True  # the client went away (or we are done): the worker drops the rest

    async def encode_text(text: str) -> list[int]:
        try:
            return await off_loop(generator.encode, text)
        except Exception as exc:  # noqa: BLE001 - text the tokenizer cannot take (lone surrogates...)
            raise APIError(
                400, f"'prompt' cannot be tokenized: {type(exc).__name__}", param="prompt"
            ) from None

    # -- /v1/completions ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionBody = await parse(request, CompletionBody)
        raw = body.prompt
        if isinstance(raw, str):
            texts: list[str | list[int]] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            texts = [list(raw)]  # one prompt of token ids
        else:
            texts = list(raw)
        if not texts:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        vocab = generator.model.config.vocab_size
        prompts: list[list[int]] = []
        for t in texts:
            ids = await encode_text(t) if isinstance(t, str) else list(t)
            if not ids:
                raise APIError(400, "'prompt' must not be empty", param="prompt")
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            prompts.append(ids)
        if len(prompts) * body.n > MAX_N:
            raise APIError(400, f"at most {MAX_N} choices (prompts x n) per request", param="n")
        params = [sampling(body, len(ids), body.max_tokens, 16) for ids in prompts]
        job = submit(prompts, params, body.n, body.stream)
        rid, now = _new_id("cmpl"), int(time.time())

        def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": settings.model_name,
                "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            gen = stream_events(job, chunk, [], {} if include_usage else None, prompts)
            return StreamingResponse(
                gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        await wait(job)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": settings.model_name,
            "choices": [
                {"index": i, "text": s.text, "logprobs": None, "finish_reason": _finish(s)}
                for i, s in enumerate(job.seqs)
            ],
            "usage": usage(job, prompts),
        }

    # -- /v1/chat/completions -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatBody = await parse(request, ChatBody)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        try:
            ids = await off_loop(generator.encode_chat, messages)
        except GenerationError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - text the tokenizer cannot take (lone surrogates...)
            raise APIError(
                400, f"'messages' cannot be tokenized: {type(exc).__name__}", param="messages"
            ) from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = sampling(body, len(ids), max_tokens, settings.default_max_tokens)
        job = submit([ids], [params], body.n, body.stream)
        rid, now = _new_id("chatcmpl"), int(time.time())

        def chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"content": text}
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": settings.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            first = []
            for i in range(body.n):
                c = chunk(i, "", None)
                c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                first.append(c)
            gen = stream_events(job, chunk, first, {} if include_usage else None, [ids])
            return StreamingResponse(
                gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        await wait(job)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": settings.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": s.text},
                    "logprobs": None,
                    "finish_reason": _finish(s),
                }
                for i, s in enumerate(job.seqs)
            ],
            "usage": usage(job, [ids]),
        }

    return app


def _finish(seq: Sequence) -> str:
    return "length" if seq.finish_reason == "length" else "stop"


def serve(
    generator: Generator,
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    app = create_app(generator, settings)
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5
    )
