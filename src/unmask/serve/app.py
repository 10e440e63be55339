"""The HTTP layer: FastAPI routes in the OpenAI shapes, errors, API key, server-sent events.

``create_app(config)`` loads the model and returns the ASGI app; ``unmask serve`` runs it
with uvicorn. Every error is an OpenAI error body with a 4xx/5xx status; nothing a client
sends can stop the server.

A request is checked cheapest first: its fields (types, bounds), then its size (prompt count,
characters), and only then tokenised, on a thread of its own so that the event loop (health
checks, other clients) never waits for a tokenizer; the token count is checked last. A client
that leaves cancels its job (see ``Batcher`` and ``Engine.run``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from unmask.models.loading import DiffusionModel, load_model
from unmask.serve.batcher import Batcher, Overloaded
from unmask.serve.chat import render_chat, resolve_template
from unmask.serve.config import ServeConfig
from unmask.serve.decoding import Progress
from unmask.serve.engine import Choice, Engine, Job
from unmask.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
)

logger = logging.getLogger(__name__)
STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded"}
T = TypeVar("T")


def create_app(config: ServeConfig, model: DiffusionModel | None = None) -> FastAPI:
    """The server's ASGI app over ``model`` (loaded from ``config.model`` when not given: a
    mask predictor or a uniform-noise model, whichever the name or folder holds)."""
    if model is None:
        model = load_model(config.model, dtype=config.dtype, device=config.device)
    model.eval()
    engine = Engine(model, config)
    template = resolve_template(engine.tokenizer, config.chat_template)
    api_key = config.api_key or os.environ.get("UNMASK_API_KEY") or None
    batcher: Batcher[Job] = Batcher(
        engine.run, config.max_batch_size, config.batch_wait_ms / 1000.0, config.max_queue
    )
    created = int(time.time())
    # One thread, so a tokenizer is never called from two threads at once.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmask-tokenizer")

    async def off_loop(work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, work)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()
        tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="unmask", summary="OpenAI-compatible dLLM server", lifespan=lifespan)
    app.state.engine = engine
    app.state.batcher = batcher
    _add_error_handlers(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise APIError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
                kind="authentication_error",
            )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    card = {"id": config.model_name, "object": "model", "created": created, "owned_by": "unmask"}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, config.model_name)
        return card

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_request(body, config.model_name)
        engine.check_fields(body)
        texts = body.prompts()
        engine.check_size(texts, body.n or 1, "prompt")
        prompts = await off_loop(lambda: engine.encode(texts, "prompt"))
        job = engine.prepare(prompts, body, body.max_tokens, "prompt")
        return await _answer(request, batcher, job, body, config.model_name, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check_request(body, config.model_name)
        engine.check_fields(body)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        engine.check_rows(1, body.n or 1, "messages")
        prompts = await off_loop(lambda: _chat_prompt(engine, template, messages))
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = engine.prepare(prompts, body, max_tokens, "messages")
        return await _answer(request, batcher, job, body, config.model_name, chat=True)

    @v1.get("/stats")
    async def stats() -> dict[str, Any]:
        """Batches run (by rows), requests waiting and refused: to watch the batching."""
        return {
            "batch_sizes": dict(sorted(batcher.batch_sizes.items())),
            "queued": batcher.queued,
            "running": batcher.running,
            "rejected": batcher.rejected,
            "cancelled": batcher.cancelled,
        }

    app.include_router(v1)
    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def _check_request(body: GenerationRequest, served: str) -> None:
    _check_model(body.model, served)
    name = body.unsupported()
    if name is not None:
        raise APIError(400, f"{name} is not supported by this server", param=name)


def _chat_prompt(engine: Engine, template: str, messages: list[dict[str, str]]) -> list[list[int]]:
    """The conversation's prompt ids (slow on long text: run off the event loop)."""
    try:
        text = render_chat(engine.tokenizer, template, messages)
    except Exception as err:  # a template may refuse a conversation (roles, order)
        message = f"the chat template refused the messages: {err}"
        raise APIError(400, message, param="messages") from err
    engine.check_chars([text], "messages")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return engine.encode([ids], "messages")


async def _answer(
    request: Request,
    batcher: Batcher[Job],
    job: Job,
    body: GenerationRequest,
    model: str,
    chat: bool,
) -> Any:
    reply = _Reply(job, model, chat)
    if not body.stream:
        future = _submit(batcher, job)
        _cancel_on_disconnect(request, future)
        return reply.full(await _result(future))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Progress | None] = asyncio.Queue()

    def emit(progress: Progress) -> None:  # called in the worker thread
        loop.call_soon_threadsafe(queue.put_nowait, progress.cpu())

    job.emit = emit
    future = _submit(batcher, job)  # refused here, before the stream starts: a plain 503
    future.add_done_callback(lambda _: queue.put_nowait(None))
    _cancel_on_disconnect(request, future)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    canvas = bool(body.diffusion and body.diffusion.stream_canvas)
    events = reply.stream(queue, future, canvas, usage)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _submit(batcher: Batcher[Job], job: Job) -> asyncio.Future[list[Choice]]:
    try:
        return batcher.submit(job)
    except Overloaded as err:
        raise APIError(
            503,
            f"the server is overloaded ({err}); retry later",
            code="server_overloaded",
            kind="server_overloaded",
        ) from err


def _cancel_on_disconnect(request: Request, future: asyncio.Future[list[Choice]]) -> None:
    """Cancel ``future`` (and so its job) when the client disconnects before it is done.

    Nothing else would: a plain response's handler runs on after its client left.
    """

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        future.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    future.add_done_callback(lambda _: watcher.cancel())


async def _result(future: asyncio.Future[list[Choice]]) -> list[Choice]:
    try:
        await asyncio.wait([future])
    except asyncio.CancelledError:  # this handler was cancelled: so is its job
        future.cancel()
        raise
    if future.cancelled():  # nobody is left to read this answer
        raise APIError(499, "the request was cancelled", kind="request_cancelled")
    try:
        return future.result()
    except Exception as err:
        logger.exception("generation failed")
        raise APIError(500, f"generation failed: {err}", kind="server_error") from err


class _Reply:
    """Builds the response objects of one request (full, or chunk by chunk)."""

    def __init__(self, job: Job, model: str, chat: bool) -> None:
        self.job = job
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _usage(self, choices: list[Choice]) -> dict[str, int]:
        prompt = self.job.prompt_tokens * self.job.n
        completion = sum(c.completion_tokens for c in choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def full(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            item: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason, "logprobs": None}
            if self.chat:
                item["message"] = {"role": "assistant", "content": c.text}
            else:
                item["text"] = c.text
            out.append(item)
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": out, "usage": self._usage(choices)}

    def _chunk(
        self,
        index: int,
        text: str | None,
        finish: str | None = None,
        canvas: dict[str, Any] | None = None,
    ) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": ""}
                if text is None
                else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text or ""
        if canvas is not None:
            choice["canvas"] = canvas
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return _sse({**head, "choices": [choice]})

    async def stream(
        self,
        queue: asyncio.Queue[Progress | None],
        future: asyncio.Future[list[Choice]],
        canvas: bool,
        usage: bool,
    ) -> AsyncIterator[str]:
        """Token deltas as the left run of final tokens grows; optionally every canvas."""
        detok = self.job.detok
        rows = self.job.rows
        sent = [""] * rows
        done = [False] * rows
        try:
            if self.chat:
                for i in range(rows):
                    yield self._chunk(i, None)
            while (view := await queue.get()) is not None:
                pairs = zip(view.final.tolist(), view.draft.tolist(), strict=True)
                for i, (ids, draft) in enumerate(pairs):
                    if done[i]:
                        continue
                    settled = detok.settle(ids, complete=False)
                    text = detok.streamable(settled)
                    delta = text[len(sent[i]) :] if text.startswith(sent[i]) else ""
                    sent[i] += delta
                    picture = None
                    if canvas:
                        shown, tokens = detok.canvas(draft)
                        picture = {
                            "step": view.nfe,
                            "block": view.block,
                            "text": shown,
                            "tokens": tokens,
                        }
                    done[i] = settled.finish is not None
                    if delta or picture or done[i]:
                        yield self._chunk(i, delta, settled.finish, picture)
            try:
                choices = await _result(future)
            except APIError as err:
                yield _sse(err.body())
                return
            for i, c in enumerate(choices):
                if not done[i]:
                    delta = c.text[len(sent[i]) :] if c.text.startswith(sent[i]) else ""
                    yield self._chunk(i, delta, c.finish_reason)
            if usage:
                head = self._head("chat.completion.chunk" if self.chat else "text_completion")
                yield _sse({**head, "choices": [], "usage": self._usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():  # the client left: drop the job, queued or running
                future.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _message(problem: dict[str, Any], param: str | None) -> str:
    """``param: what is wrong (got value)``, the value cut short: it may be a huge prompt."""
    message = str(problem.get("msg", "invalid value"))
    if param is None:
        return message
    if not message.startswith(param):
        message = f"{param}: {message}"
    if problem.get("type") == "missing":
        return message
    shown = json.dumps(problem.get("input"), default=str)
    return f"{message} (got {shown if len(shown) <= 40 else shown[:37] + '...'})"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in problem.get("loc", ()) if p != "body"]
        if problem.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {problem.get('ctx', {}).get('error', '')}"
            return JSONResponse(APIError(400, message.strip(": ")).body(), status_code=400)
        param = ".".join(loc) or None
        return JSONResponse(APIError(400, _message(problem, param), param=param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = STATUS_TYPES.get(err.status_code, "invalid_request_error")
        body = APIError(err.status_code, str(err.detail), kind=kind).body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        body = APIError(500, f"internal error: {type(err).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)
