"""Optional API keys: ``CAPT_API_KEY`` (one key) or ``CAPT_API_KEYS_FILE`` (one key per line, ``#``
comments and blank lines skipped). With keys set, every request except the health and metrics
endpoints and the static try-it page under ``/ui`` must carry ``Authorization: Bearer <key>``; the key
is compared with ``hmac.compare_digest`` against every configured key (the time taken does not say
which key, or how much of one, matched). Without either variable the server runs open, and says so in
its log. A key that is set but empty, or a file without keys, is an error at start, never "auth off".
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import string
from pathlib import Path
from typing import Mapping, Sequence

logger = logging.getLogger("capt.serving")

API_KEY_ENV = "CAPT_API_KEY"
API_KEYS_FILE_ENV = "CAPT_API_KEYS_FILE"
# Open without a key: what orchestrators and scrapers call (healthz is BentoML's alias of livez), and the
# static page under /ui, whose JavaScript sends the key itself with each API call.
PUBLIC_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})
PUBLIC_PREFIXES = ("/ui",)
# Characters a key may have: what fits in an HTTP header as it is, without quoting or spaces.
KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation)


class ApiKeyConfigError(RuntimeError):
    """The key settings are unusable; raised where the service module is imported, so that
    ``bentoml serve`` stops at start."""


def _checked(key: str, where: str) -> bytes:
    if not key:
        raise ApiKeyConfigError(f"{where} is empty: unset it to serve without API keys, or give a key")
    if not set(key) <= KEY_CHARACTERS:
        raise ApiKeyConfigError(f"{where} holds a key with spaces, control or non-ASCII characters")
    return key.encode("ascii")


def load_api_keys(environ: Mapping[str, str] | None = None) -> tuple[bytes, ...] | None:
    """The configured keys, or None when neither variable is set (auth off)."""
    environ = os.environ if environ is None else environ
    key, path = environ.get(API_KEY_ENV), environ.get(API_KEYS_FILE_ENV)
    if key is not None and path is not None:
        raise ApiKeyConfigError(f"set {API_KEY_ENV} or {API_KEYS_FILE_ENV}, not both")
    if key is not None:
        return (_checked(key.strip(), API_KEY_ENV),)
    if path is None:
        return None
    if not path:
        raise ApiKeyConfigError(f"{API_KEYS_FILE_ENV} is empty: unset it to serve without API keys")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ApiKeyConfigError(f"{API_KEYS_FILE_ENV}: cannot read {path}: {err}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_checked(line, f"{API_KEYS_FILE_ENV} line {number}"))
    if not keys:
        raise ApiKeyConfigError(f"{API_KEYS_FILE_ENV} ({path}) holds no key (only blank or # lines)")
    return tuple(dict.fromkeys(keys))


def describe(keys: Sequence[bytes] | None) -> str:
    """The start-up log line: whether keys are required and how many there are, never the keys."""
    if not keys:
        return (f"API keys: off, every endpoint is open (set {API_KEY_ENV} or {API_KEYS_FILE_ENV} to require "
                f"'Authorization: Bearer <key>')")
    source = API_KEY_ENV if os.environ.get(API_KEY_ENV) is not None else API_KEYS_FILE_ENV
    return (f"API keys: on, {len(keys)} key{'s' if len(keys) != 1 else ''} from {source}; open without a key: "
            f"{', '.join(sorted(PUBLIC_PATHS))} and {', '.join(p + '/' for p in PUBLIC_PREFIXES)}")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or any(path == p or path.startswith(p + "/") for p in PUBLIC_PREFIXES)


def key_matches(presented: bytes, keys: Sequence[bytes]) -> bool:
    """Compared with every key, each with ``hmac.compare_digest`` and no early exit. Both sides are
    hashed first, so that the comparison's time depends on neither key's length."""
    digest = hashlib.sha256(presented).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key).digest())
    return matched


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def unauthorized_body(path: str, message: str) -> dict:
    """OpenAI's error envelope on /v1 (what its clients parse), ``{"error": message}`` elsewhere."""
    if path == "/v1" or path.startswith("/v1/"):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
    return {"error": message}


class ApiKeyAuth:
    """ASGI middleware: 401 with ``WWW-Authenticate: Bearer`` unless the request is public or carries
    one of ``keys``. With ``keys`` None it passes everything through."""

    def __init__(self, app, keys: Sequence[bytes] | None):
        self.app, self.keys = app, tuple(keys) if keys else None

    async def __call__(self, scope, receive, send):
        if self.keys is None or scope["type"] not in ("http", "websocket") or is_public(scope.get("path", "")):
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if scope["type"] == "http" and scope.get("method") == "OPTIONS" and any(
                name.lower() == b"access-control-request-method" for name, _ in headers):
            return await self.app(scope, receive, send)  # a CORS preflight carries no credentials by design
        token = bearer_token(headers)
        if token is not None and key_matches(token, self.keys):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        message = ("missing API key: send 'Authorization: Bearer <key>'" if token is None
                   else "invalid API key")
        body = json.dumps(unauthorized_body(scope.get("path", ""), message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="capt"')]})
        await send({"type": "http.response.body", "body": body})
