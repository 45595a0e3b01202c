"""The server's guards: who may call, under which host name, how big a body may be, what a
refusal may quote.

The first three are plain ASGI middleware that act on the raw request: an unauthenticated
caller, a foreign Host header or an oversized body is refused before any of it is parsed
(FastAPI reads a body whole and then builds Python objects from it, several times its size in
memory). The dashboard (`lmadapt ui`) uses them too.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmadapt.serve.settings import host_name

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
    Requests under the path `skip` pass untouched (an app mounted there keeps its own limit);
    `setting` is what the refusal names as the way to raise the limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        skip: str | None = None,
        setting: str | None = "--max-body-bytes",
    ) -> None:
        self.app, self.limit, self.skip, self.setting = app, limit, skip, setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        skipped = self.skip is not None and (path == self.skip or path.startswith(self.skip + "/"))
        if scope["type"] != "http" or skipped:
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
        detail = f"request body {what}; the limit is {self.limit}"
        if self.setting:
            detail += f" ({self.setting})"
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


class HostCheck:
    """400 unless the Host header names one of `hosts` (any port): the defence against DNS
    rebinding, where a web page re-points its own name at this address so that the browser lets
    it read the answers. The page's requests still carry its own name, and are refused here."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app, self.hosts = app, frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = _header(scope, b"host")
        name = host_name(raw.decode("latin-1")) if raw is not None else None
        if name in self.hosts:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before accept: a 403
        else:
            shown = "no Host header" if raw is None else f"Host {shorten(raw.decode('latin-1'))!r}"
            detail = f"{shown} is not a name of this server; add one with --allowed-host NAME"
            await JSONResponse({"detail": detail}, 400)(scope, receive, send)


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
