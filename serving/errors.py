"""Errors a client caused or must wait out, each with its HTTP status; the message is for the client."""
from __future__ import annotations

from http import HTTPStatus


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
