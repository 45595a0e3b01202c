"""The server's guards: who may call, how big a body may be, what a refusal may quote.

The first two are plain ASGI middleware that act on the raw request: an unauthenticated caller
or an oversized body is refused before any of it is parsed (FastAPI reads a body whole and then
builds Python objects from it, several times its size in memory).
"""

from __future__ import annotations

import hmac

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_ERRORS = 10
"""Validation errors listed in a 422 (the total is given too)."""
MAX_FIELD = 64
"""Longest name quoted back in an error (a request's own field names, an unknown model name)."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


class BodyLimit:
    """413 for a request body over `limit` bytes: at once when Content-Length says so, else
    (chunked upload) as soon as the bytes received pass the limit, without reading the rest.

    The body is read here, then handed to the app as one message: it is at most `limit` bytes.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self.refuse(scope, receive, send, f"has {int(length)} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: nobody to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self.refuse(scope, receive, send, f"passed {self.limit} bytes")
                return
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        chunks.clear()

        async def replay() -> Message:
            """The buffered body first, then the client's own messages (a disconnect)."""
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        """413. The connection stays open: the server discards whatever of the body still
        arrives, so a client that is still uploading gets to read this answer (closing would
        reset the connection under it)."""
        detail = f"request body {what}; the limit is {self.limit} (--max-body-bytes)"
        await JSONResponse({"detail": detail}, 413)(scope, receive, send)


class ApiKey:
    """401 unless the request sends `Authorization: Bearer <key>` (as OpenAI clients do).

    The key is compared in constant time, so response timing does not leak how much of a
    guess was right.
    """

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(scope):
            response = JSONResponse(
                {"detail": "missing or wrong API key: send the header 'Authorization: Bearer KEY'"},
                401,
                headers={"www-authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self.key)


def shorten(part: str | int, limit: int = MAX_FIELD) -> str | int:
    """`part` (a field name or index, a message) cut to `limit` characters when longer."""
    if isinstance(part, int) or len(part) <= limit:
        return part
    return part[: limit - 3] + "..."


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 saying where and why, never what: FastAPI's default handler echoes each rejected
    input, so a large bad body came straight back. Field names (a request's own keys) and
    messages are cut short, and only the first MAX_ERRORS errors are listed."""
    errors = exc.errors()
    detail = [
        {
            "loc": [shorten(part) for part in e["loc"]],
            "msg": shorten(str(e["msg"]), 4 * MAX_FIELD),
            "type": e["type"],
        }
        for e in errors[:MAX_ERRORS]
    ]
    return JSONResponse({"detail": detail, "error_count": len(errors)}, 422)
