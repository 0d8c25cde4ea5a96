"""FastAPI app factory: the lifespan owns one engine; routers are thin; one error shape."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ann_mlp.errors import AnnMlpError
from server.engine import Engine
from server.errors import BodyTooLarge, InvalidRequest, ServiceError
from server.metrics import Metrics
from server.routes import native, openai, system
from server.settings import ServerSettings

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, kind: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """OpenAI's error shape, on every route."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """413 for bodies over the limit, counted on the bytes actually received (not only Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413, f"body of {int(declared)} bytes exceeds {self.max_bytes}", BodyTooLarge.kind, BodyTooLarge.code
            )
            return await response(scope, receive, send)
        # Read the body first (it is small by definition), stopping at the limit,
        # then replay it: an over-long body is answered here, before any parsing.
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = message.get("more_body", False)
            if received > self.max_bytes:
                response = error_response(
                    413, f"body exceeds {self.max_bytes} bytes", BodyTooLarge.kind, BodyTooLarge.code
                )
                return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Observe:
    """Requests in flight, latency by route and mode, and answers by status code.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which hides a client's disconnect
    from the route (Request.is_disconnected), and with it the chance to stop abandoned work.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless an answer starts

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.in_flight.dec()
            mode = scope.get("state", {}).get("mode", "-")  # set by the route (request.state.mode)
            self.metrics.latency.labels(scope["path"], mode).observe(time.perf_counter() - start)
            self.metrics.requests.labels(scope["path"], str(status)).inc()


class UnexpectedErrors:
    """A JSON 500 for an exception no handler took, on a connection that stays open.

    Starlette's last-resort handler answers and then re-raises, and the server closes the
    keep-alive connection, so a pooled client's next request could meet a reset.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error")
            if started:  # part of an answer is out: nothing valid can follow on this connection
                raise
            await error_response(500, "internal error", "server_error", "internal_error")(scope, receive, send)


async def one_replica() -> int:
    return 1


def create_app(settings: ServerSettings, replica_count: Callable[[], Awaitable[int]] = one_replica) -> FastAPI:
    """The app of one engine. `replica_count` gives the live replicas the health and model routes
    report: 1 for a plain process, Ray Serve's count when the app is one of its replicas."""
    metrics = Metrics()
    engine = Engine(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.load)  # verify checksums, load, warm up: then serve
        yield
        engine.begin_drain()
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="ann-mlp", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.replica_count = replica_count
    for router in (openai.router, native.router, system.router):
        app.include_router(router)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, err: ServiceError) -> JSONResponse:
        headers = None if err.retry_after_s is None else {"Retry-After": str(err.retry_after_s)}
        return error_response(err.status, err.message, err.kind, err.code, err.param, headers)

    @app.exception_handler(AnnMlpError)
    async def library_error(_request: Request, err: AnnMlpError) -> JSONResponse:
        return error_response(400, str(err), InvalidRequest.kind, InvalidRequest.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc is (body, character offset), not a field
            at = first["loc"][-1]
            return error_response(
                422,
                f"the body is not valid JSON (character {at}): {first['msg']}",
                "invalid_request_error",
                "invalid_json",
            )
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return error_response(422, message, "invalid_request_error", "invalid_value", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        # err.headers carries e.g. the Allow header of a 405
        return error_response(
            err.status_code, str(err.detail), "invalid_request_error", "http_error", headers=err.headers
        )

    app.add_middleware(Observe, metrics=metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(UnexpectedErrors)
    return app
