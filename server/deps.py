"""Shared route dependencies: the engine from app state, and the optional bearer key.

Both are `async def` though neither awaits: FastAPI runs a plain `def` dependency in its
thread pool, a thread hop per dependency and request on the path every request takes."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.engine import Engine
from server.errors import Unauthorized


async def engine(request: Request) -> Engine:
    return request.app.state.engine


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not tell how much of the key matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key (Authorization: Bearer ...)")
