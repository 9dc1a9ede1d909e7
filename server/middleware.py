"""ASGI middleware of the server: bearer-token authentication and the request-size limit, and the error envelope
they answer in."""

from __future__ import annotations

import hashlib
import json
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNGUARDED_PATHS = ("/health", "/v1/health/live", "/v1/health/ready")


async def json_error(send: Send, status: int, message: str, kind: str, param: str | None = None,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:  # fmt: skip
    """Answers with the error envelope (`{"error": {"message", "type", "param", "code"}}`)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BearerAuthMiddleware:
    """Every route but health needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key_hash = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS"
                or scope["path"] in UNGUARDED_PATHS):  # fmt: skip
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self.key_hash):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # closed before the handshake: the client sees HTTP 403
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
        await json_error(send, 401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")


class RequestSizeLimitMiddleware:
    """Bodies over `max_bytes` get 413, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await json_error(send, 413, too_large, "request_too_large")
        received = 0
        refused = False  # 413 sent: the app sees a disconnect and whatever it answers is dropped

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not refused:
                    refused = True
                    await json_error(send, 413, too_large, "request_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
