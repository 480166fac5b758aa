"""Carrying one HTTP request from the ingress to an engine replica, and its response back, as plain data.

The replica runs the single-node FastAPI app (``server.api.app.create_app``) in-process: ``call_asgi`` drives it
with one request and yields what it sends, so every route, key check, size guard and error body is the single-node
server's own, and Server-Sent Events stream through chunk by chunk (httpx's ASGI transport buffers whole bodies).
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
AsgiApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

# Framing that belongs to one hop: the ingress's server sets its own.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"})


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it (the body read whole, within the size limits)."""

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    """The status line and headers; the first item of every forwarded response, body chunks (bytes) follow."""

    status: int
    headers: tuple[tuple[str, str], ...] = field(default=())

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def call_asgi(
    app: AsgiApp, request: ForwardedRequest, extra_headers: tuple[tuple[str, str], ...] = ()
) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``request`` through ``app``: one ResponseStart (with ``extra_headers`` added), then the body's chunks.

    Closing the iterator early (the client went away) tells the app the client disconnected, as a server would, so
    a streaming generation is cancelled and frees its batch row."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": request.client,
        "server": ("lora-server-replica", 0),
        "state": {},
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()  # the body is read: the next message is the client leaving
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                headers = tuple(
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() not in HOP_HEADERS
                )
                yield ResponseStart(int(message["status"]), headers + extra_headers)
            elif message["type"] == "http.response.body":
                chunk, more = bytearray(message.get("body", b"")), bool(message.get("more_body", False))
                # Under load the app sends faster than the caller takes: send what is waiting as one chunk, since
                # each item costs an object transfer between Ray processes.
                while more and not sent.empty():
                    following = sent.get_nowait()
                    if following is None:  # the app returned without ending its body
                        more = False
                        break
                    chunk += following.get("body", b"")
                    more = bool(following.get("more_body", False))
                if chunk:
                    yield bytes(chunk)
                if not more:
                    break
        if not started:  # the app failed without answering (its own error handlers answer every known failure)
            if task.done() and task.exception() is not None:
                _log.error("the app raised without answering %s %s", request.method, request.path,
                           exc_info=task.exception())  # fmt: skip
            body = {"error": {"type": "internal", "message": "the engine replica failed to answer"}}
            yield ResponseStart(500, (("content-type", "application/json"), *extra_headers))
            yield json.dumps(body).encode()
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
