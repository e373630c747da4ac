"""Errors a client caused or must wait out, each with its HTTP status; the message is for the client."""
from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse


class ClientError(Exception):
    status = HTTPStatus.BAD_REQUEST


class RequestError(ClientError, ValueError):
    """A request the server refuses (400)."""


class ImageRejected(RequestError):
    """The bytes are not an image this server will decode (400)."""


class Busy(ClientError):
    """Too many probes at once (429): retry later."""
    status = HTTPStatus.TOO_MANY_REQUESTS


class ProbeTimeout(ClientError):
    """A probe ran past its time limit and was stopped (503)."""
    status = HTTPStatus.SERVICE_UNAVAILABLE


def error_response(err: ClientError) -> JSONResponse:
    """The refusal as every endpoint sends it: ``{"error": message}`` with its status (and
    ``Retry-After`` when the client should wait and retry)."""
    headers = {"Retry-After": "1"} if isinstance(err, Busy) else None
    return JSONResponse({"error": str(err)}, status_code=int(err.status), headers=headers)
