"""What stands in front of every endpoint: request bodies over a size limit are answered 413 before
any of them is parsed or spooled to disk, a multipart body without a boundary gets a 400, file fields
take uploads only (never URLs to fetch), and refused requests are logged without their content."""
from __future__ import annotations

import io
import json
import logging


async def refuse(send, status: int, message: str) -> None:
    """Answers ``status`` with ``{"error": message}`` and closes the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
                return await refuse(send, 400, "Content-Length is not a number")
            if length > self.max_bytes:
                return await refuse(send, 413, self._message(length))
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
                return await refuse(send, 413, self._message(received, at_least=True))
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


class MultipartBoundaryRequired:
    """A ``multipart/form-data`` body without a ``boundary`` cannot be parsed; Starlette's form parser
    raises a KeyError on it, which BentoML turns into a 500 (found by schemathesis)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"").lower()
            if content_type.startswith(b"multipart/form-data") and b"boundary=" not in content_type:
                return await refuse(send, 400, "multipart/form-data without a boundary parameter")
        return await self.app(scope, receive, send)


def harden_multipart() -> None:
    """Two fixes to BentoML's multipart parsing (``MultipartSerde``), both found by schemathesis:

    - a text value sent for a file field is taken as a URL and downloaded: a server-side request to
      wherever a client says (and a 500 when uvloop is missing). Here the text is the file's
      content instead, so it reaches our image decoder like any upload and is refused there (400)
      unless it is an image;
    - a malformed body raises Starlette's HTTPException(400) (or the parser's own error), which
      BentoML turned into a 500. Here it is a
      400 with the same body as any other invalid request (``{"error", "detail"}``).
    """
    from _bentoml_impl.serde import MultipartSerde
    from pydantic import ValidationError
    from python_multipart.exceptions import MultipartParseError
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    async def as_upload(value):
        if isinstance(value, UploadFile):
            return value
        data = str(value).encode()
        return UploadFile(io.BytesIO(data), size=len(data), filename="text-field")

    parse_request = MultipartSerde.parse_request

    async def parse_or_refuse(self, request, cls):
        try:
            return await parse_request(self, request, cls)
        except (MultiPartException, MultipartParseError, HTTPException) as err:
            if isinstance(err, HTTPException) and err.status_code >= 500:
                raise
            reason = err.detail if isinstance(err, HTTPException) else err
            raise ValidationError.from_exception_data("multipart body", [{
                "type": "value_error", "loc": ("body",), "input": None,
                "ctx": {"error": ValueError(f"malformed multipart body: {reason}")}}]) from None

    MultipartSerde.ensure_file = staticmethod(as_upload)
    MultipartSerde.parse_request = parse_or_refuse


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
