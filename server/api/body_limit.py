"""``BodySizeGuard``: request bodies over their limit get 413 before they are read into memory.

Adapter uploads have their own (large) limit; every other request has a small one. A declared Content-Length over
the limit is refused before a byte of the body is read. A body without one (chunked transfer) is counted as it
streams in: at the limit the guard stops reading, tells the app the client is gone, and swaps whatever the app then
answers (a parse error) for the 413.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response

UPLOAD_PATH = "/v1/adapters"


class BodySizeGuard:
    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_request_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_request_bytes = max_request_bytes

    def limit_for(self, scope: Scope) -> int:
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        return self.max_upload_bytes if is_upload else self.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        too_large = error_response(413, "too_large", f"request bodies here are limited to {limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await too_large(scope, receive, send)
            return

        received = 0
        exceeded = False
        replaced = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer for it below
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if not exceeded:
                await send(message)
            elif not replaced:
                replaced = True
                await too_large(scope, receive, send)

        await self.app(scope, counting_receive, guarded_send)
        if exceeded and not replaced:  # the app gave up without answering
            await too_large(scope, receive, send)
