"""The ASGI app: OpenAI-compatible routes over the scheduler, with OpenAI-style errors.

Every handler parses its body into a schema, turns it into the native request
(`openai_adapter`), submits it to the `Scheduler` and renders the Events it gets back.
Any input mistake is a 4xx with an OpenAI error object; an unexpected failure is a 500 for
that request alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import edgeai
from edgeai.engine.tools import CallStream
from edgeai.errors import EdgeAIError, ModelNotFound, ResourceError
from edgeai.server import openai_adapter as oa
from edgeai.server import schemas as s
from edgeai.server.escalation import Escalation, Run
from edgeai.server.metrics import CONTENT_TYPE, Metrics
from edgeai.server.models import ModelRegistry
from edgeai.server.openapi import document
from edgeai.server.scheduler import QueueFull, Scheduler
from edgeai.types import Answer, Event

DEFAULT_MAX_BODY = 4 << 20  # bytes; a long prompt is ≈ 100 KB, nothing needs more
EMBED_MODELS = ("all-minilm-l6-v2",)  # the router's sentence encoder (edgeai.routing.embed)


@dataclass
class Settings:
    """Server knobs that are not the scheduler's.

    Attributes:
        max_body: largest request body accepted, in bytes (413 beyond).
        policy: the escalation policy for requests that do not set one (None: config.toml's,
            else "auto").
    """

    max_body: int = DEFAULT_MAX_BODY
    policy: str | None = None


class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        err = s.ErrorResponse(
            error=s.ErrorDetail(
                message=self.message, type=self.type, param=self.param, code=self.code
            )
        )
        return JSONResponse(err.model_dump(), status_code=self.status, headers=self.headers)


def _api_error(e: BaseException) -> ApiError:
    """The HTTP answer for an error raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(
            503,
            str(e),
            "server_busy",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        )
    if isinstance(e, ModelNotFound):
        msg = e.message + (f" ({e.hint})" if e.hint else "")
        return ApiError(404, msg, param="model", code="model_not_found")
    if isinstance(e, ResourceError):
        return ApiError(
            503, str(e), "server_busy", code="insufficient_memory", headers={"Retry-After": "30"}
        )
    if isinstance(e, EdgeAIError):
        msg = e.message + (f" ({e.hint})" if e.hint else "")
        return ApiError(
            400, msg, code="context_length_exceeded" if "accepts at most" in e.message else None
        )
    return ApiError(500, f"internal error: {e}", "server_error")


# -- request parsing ---------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"the request body is {declared} bytes; the limit is {limit}",
            code="body_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"the request body is over the {limit}-byte limit", code="body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The body as `model`, or an ApiError saying exactly what is wrong with it."""
    raw = await _read_body(request, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    try:  # lone surrogates (\ud800) parse as JSON but are not text any tokenizer can take
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, "the request contains invalid Unicode (a lone surrogate)", code="invalid_unicode"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError) -> ApiError:
    """A 400 naming the first invalid field (pydantic's own message)."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    msg = f"{where}: {first['msg']}" if where else first["msg"]
    return ApiError(400, msg, param=where, code="invalid_value")


def _native(convert: Callable[[Any], oa.NativeRequest], req: Any) -> oa.NativeRequest:
    """The native request; GenerationOptions' own checks become 400s too."""
    try:
        return convert(req)
    except ValidationError as e:
        raise _invalid(e) from None


# -- the app -----------------------------------------------------------------------------


class Server:
    """The routes, bound to one scheduler, model registry and metrics."""

    def __init__(
        self,
        scheduler: Scheduler,
        registry: ModelRegistry,
        metrics: Metrics,
        settings: Settings | None = None,
        escalation: Escalation | None = None,
    ):
        self.scheduler = scheduler
        self.registry = registry
        self.metrics = metrics
        self.settings = settings or Settings()
        self.escalation = escalation or Escalation(scheduler)
        metrics.bind(scheduler.queue_depth, scheduler.active_count, scheduler.recent_tps)

    # -- generation --------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req = await parse(request, s.ChatCompletionRequest, self.settings.max_body)
        return await self._generate(request, _native(oa.from_chat, req))

    async def completions(self, request: Request) -> Response:
        req = await parse(request, s.CompletionRequest, self.settings.max_body)
        return await self._generate(request, _native(oa.from_completion, req))

    async def _generate(self, request: Request, nreq: oa.NativeRequest) -> Response:
        name, path = self.registry.resolve(nreq.model)
        nreq.policy = self.escalation.policy(nreq.policy or self.settings.policy)
        cancel = threading.Event()
        # Watch from the start: a client that gives up while queued must not be served later.
        watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
        try:
            run = await self.escalation.start(
                nreq.kind,
                nreq.prompt,
                nreq.options,
                name,
                path,
                nreq.policy,
                cancel,
                nreq.logits,
                nreq.adapter,
                nreq.constraint,
            )
        except BaseException as e:
            watcher.cancel()
            if isinstance(e, QueueFull):
                self.metrics.rejected.inc()
            raise
        if nreq.stream:
            return StreamingResponse(
                self._sse(nreq, run, watcher),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            events = [ev async for ev in run]
        finally:
            run.cancel.set()  # a no-op when finished; stops the job if this task is cancelled
            watcher.cancel()
        ans = self._answer(nreq, run, events)
        return JSONResponse(oa.body(nreq, ans, events, run.engine.tokenizer))

    def _answer(self, nreq: oa.NativeRequest, run: Run, events: list[Event]) -> Answer:
        ans = run.answer or Answer.from_events(events, nreq.model)
        self.metrics.answers.labels(ans.tier).inc()
        if ans.tier != "local":
            self.metrics.escalations.labels(ans.tier).inc()
        return ans

    async def _sse(
        self, nreq: oa.NativeRequest, run: Run, watcher: asyncio.Task
    ) -> AsyncIterator[bytes]:
        events: list[Event] = []
        tok = run.engine.tokenizer
        calls = CallStream() if nreq.tool_calls else None
        try:
            yield oa.chunk(nreq, None, tok, first=True)
            # Tokens that arrived while the last chunk was being written go out as one chunk:
            # on a small machine the writer, the client and the model share the cores.
            async for group in run.groups():
                events += group
                if calls is None:
                    send = [
                        ev
                        for ev in group
                        if ev.finish_reason is None
                        and (ev.text or (nreq.logprobs is not None and ev.token is not None))
                    ]
                    if send:
                        yield oa.chunk(nreq, send, tok)
                    continue
                for ev in group:  # text around tool calls streams; each call comes whole
                    for item in calls.feed(ev.text) if ev.text else []:
                        yield self._tool_item(nreq, item, calls)
                    if ev.finish_reason is not None:
                        for item in calls.flush():
                            yield self._tool_item(nreq, item, calls)
            ans = self._answer(nreq, run, events)
            finish = ans.finish_reason
            if calls is not None and calls.calls and finish == "stop":
                finish = "tool_calls"
            yield oa.chunk(nreq, None, tok, finish=finish, ans=ans)
            if nreq.include_usage:
                yield oa.usage_chunk(nreq, ans)
            yield oa.DONE
        except Exception as e:  # headers are sent: report the error in-band, as OpenAI does
            err = _api_error(e)
            yield oa.sse({"error": {"message": err.message, "type": err.type, "code": err.code}})
        finally:
            run.cancel.set()
            watcher.cancel()

    @staticmethod
    def _tool_item(nreq: oa.NativeRequest, item: tuple[str, Any], calls: CallStream) -> bytes:
        kind, value = item
        if kind == "call":
            return oa.tool_call_chunk(nreq, value, calls.calls - 1)
        return oa.text_chunk(nreq, value)

    # -- the rest ----------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        req = await parse(request, s.EmbeddingRequest, self.settings.max_body)
        if req.model.lower() not in EMBED_MODELS:
            raise ApiError(
                404,
                f"embedding model '{req.model}' is not served here; use {EMBED_MODELS[0]}",
                param="model",
                code="model_not_found",
            )
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        try:
            vectors, tokens = await self.escalation.embed(texts)
        except ModelNotFound as e:  # the encoder's weights are not on this machine
            msg = e.message + (f" ({e.hint})" if e.hint else "")
            raise ApiError(501, msg, "not_implemented", code="embeddings_unavailable") from None
        data = [s.Embedding(index=i, embedding=v) for i, v in enumerate(vectors)]
        out = s.EmbeddingList(
            data=data,
            model=req.model,
            usage=s.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
        )
        return JSONResponse(out.model_dump())

    async def models(self, request: Request) -> Response:
        cards = [s.ModelCard(id=n) for n in [*self.registry.names(), EMBED_MODELS[0]]]
        return JSONResponse(s.ModelList(data=cards).model_dump())

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            s.Health(
                status="ok", version=edgeai.__version__, **self.scheduler.status()
            ).model_dump()
        )

    async def ps(self, request: Request) -> Response:
        return JSONResponse(self.scheduler.status())

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(document())


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` as soon as the client goes away (the body has been read already)."""
    with contextlib.suppress(Exception):
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                cancel.set()
                return


def _handle(fn: Callable, metrics: Metrics, path: str) -> Callable:
    """Wrap a route: ApiError/EdgeAIError/QueueFull → error object; anything else → 500."""

    async def endpoint(request: Request) -> Response:
        try:
            resp = await fn(request)
        except Exception as e:
            resp = _api_error(e).response()
        metrics.requests.labels(path, str(resp.status_code)).inc()
        return resp

    return endpoint


def build_app(
    scheduler: Scheduler,
    registry: ModelRegistry,
    *,
    metrics: Metrics | None = None,
    settings: Settings | None = None,
    escalation: Escalation | None = None,
    manage_scheduler: bool = True,
) -> Starlette:
    """The Starlette app. With `manage_scheduler`, its lifespan starts and stops the scheduler."""
    metrics = metrics or Metrics()
    srv = Server(scheduler, registry, metrics, settings, escalation)
    table = [
        ("/v1/chat/completions", srv.chat, ["POST"]),
        ("/v1/completions", srv.completions, ["POST"]),
        ("/v1/embeddings", srv.embeddings, ["POST"]),
        ("/v1/models", srv.models, ["GET"]),
        ("/health", srv.health, ["GET"]),
        ("/api/ps", srv.ps, ["GET"]),
        ("/metrics", srv.metrics_text, ["GET"]),
        ("/openapi.json", srv.openapi, ["GET"]),
    ]
    routes = [Route(p, _handle(fn, metrics, p), methods=m) for p, fn, m in table]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if manage_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            if manage_scheduler:
                await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no route {request.url.path}"
        return ApiError(
            status, msg, code="not_found" if status == 404 else "method_not_allowed"
        ).response()

    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}
    )
    app.state.server = srv
    return app
