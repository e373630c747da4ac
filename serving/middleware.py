"""What stands in front of every endpoint: request bodies over a size limit are answered 413 before
any of them is parsed or spooled to disk, and refused requests are logged without their content."""
from __future__ import annotations

import json
import logging


class BodySizeLimit:
    """Refuses a body over ``max_bytes``: at once when ``Content-Length`` says so, and for chunked
    bodies (no length given) as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await self._refuse(send, 400, "Content-Length is not a number")
            if length > self.max_bytes:
                return await self._refuse(send, 413, self._message(length))
            return await self.app(scope, receive, send)
        # No length: read the body here, within the limit, and replay it to the application.
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                return await self._refuse(send, 413, self._message(received, at_least=True))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (f"request body of {'more than ' if at_least else ''}{size} bytes is over the limit of "
                f"{self.max_bytes} bytes (CAPT_MAX_REQUEST_BYTES)")

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _RedactValidationErrors(logging.Filter):
    """BentoML logs a refused request's pydantic error with its traceback, whose text quotes the
    offending input (which may be image data). Keep the line, drop the quoted input."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['type']}" for e in error.errors())
            record.msg = f"{record.getMessage()}: refused ({where})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def redact_request_errors() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_RedactValidationErrors())
