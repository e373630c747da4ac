"""What stands in front of every endpoint: request bodies over a size limit are answered 413 before
any of them is parsed or spooled to disk, a multipart body without a boundary gets a 400, file fields
take uploads only (never URLs to fetch), and refused requests are logged without their content.
The last two patch BentoML internals and fail closed: see VERIFIED_BENTOML_VERSIONS. So does
``cancel_request_timers``, which stops BentoML's request timeout from keeping every answered request
alive for the length of the timeout."""
from __future__ import annotations

import asyncio
import contextvars
import importlib
import importlib.metadata
import inspect
import io
import json
import logging
import os
import types

logger = logging.getLogger("capt.serving")

# ``harden_multipart`` and ``redact_request_errors`` replace or filter private parts of BentoML (below);
# these are the releases whose source they were checked against. Each patch also checks, when it is
# applied, that what it replaces is still there and still the code it was written for (a rename would
# otherwise add a dead attribute and leave the hole open), and raises RuntimeError if not, which stops
# the server's start. Those checks catch renames and moves, not a change of behaviour under the same
# names, so another release is refused too unless CAPT_ALLOW_UNVERIFIED_BENTOML=1 says that someone has
# checked it (then it is a warning): run tests/test_bad_input.py and tests/test_middleware.py against it
# and add it here.
VERIFIED_BENTOML_VERSIONS = ("1.4.40",)
ALLOW_UNVERIFIED_ENV = "CAPT_ALLOW_UNVERIFIED_BENTOML"
# BentoML logs a refused request through ``log_exception`` of this module, on the module's own logger.
REQUEST_ERROR_MODULE = "bentoml._internal.server.http_app"
# The app of BentoML's new-style services (``@bentoml.service``), which imports that ``log_exception``.
SERVICE_APP_MODULE = "_bentoml_impl.server.app"


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


def _bentoml_version() -> str:
    return importlib.metadata.version("bentoml")


def check_bentoml_version() -> str:
    """The installed BentoML's version; RuntimeError if the patches were not verified against it
    (a warning instead with CAPT_ALLOW_UNVERIFIED_BENTOML=1)."""
    version = _bentoml_version()
    if version in VERIFIED_BENTOML_VERSIONS:
        return version
    message = (f"BentoML {version} is installed; the request hardening in serving/middleware.py patches "
               f"BentoML internals and was verified on {', '.join(VERIFIED_BENTOML_VERSIONS)} only")
    if os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
        logger.warning("%s (%s=1: serving anyway)", message, ALLOW_UNVERIFIED_ENV)
        return version
    raise RuntimeError(f"{message}. Install bentoml=={VERIFIED_BENTOML_VERSIONS[-1]} (requirements.txt), or check "
                       f"this release and set {ALLOW_UNVERIFIED_ENV}=1")


def _refuse_patch(what: str, problem: str, consequence: str = "would reopen the hole it closes",
                  where: str = "serving/middleware.py") -> RuntimeError:
    return RuntimeError(f"cannot patch BentoML {_bentoml_version()}: {what} {problem}; serving without this "
                        f"patch {consequence} (see {where}), so the server stops")


def _names_used(code: types.CodeType) -> set[str]:
    """Global and attribute names a function's code uses, comprehensions' nested code included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_used(const)
    return names


def _original_method(cls: type, name: str, static: bool, must_use: str | None = None):
    """``cls.name`` as BentoML defines it (in ``_bentoml_impl.serde``, on ``cls`` itself) or our patch
    of it; anything else, e.g. missing after a rename, raises RuntimeError naming it."""
    what = f"{cls.__module__}.{cls.__qualname__}.{name}"
    attribute = cls.__dict__.get(name)
    if attribute is None:
        raise _refuse_patch(what, "does not exist (renamed or moved?)")
    function = attribute.__func__ if isinstance(attribute, staticmethod) else attribute
    if getattr(function, "_capt_patch", False):
        return function
    if isinstance(attribute, staticmethod) != static or not inspect.isfunction(function):
        raise _refuse_patch(what, f"is no longer a {'static method' if static else 'method'}")
    if function.__module__ != "_bentoml_impl.serde" or function.__qualname__ != f"{cls.__qualname__}.{name}":
        raise _refuse_patch(what, f"is {function.__module__}.{function.__qualname__}, not BentoML's own")
    if must_use and must_use not in _names_used(function.__code__):
        raise _refuse_patch(what, f"no longer calls {must_use}")
    return function


def _ours(original):
    """Marks a replacement as ours, keeping what it replaced (for a test or a debugger to get back)."""
    def mark(function):
        function._capt_patch, function._capt_original = True, original
        return function
    return mark


def harden_multipart() -> None:
    """Two fixes to BentoML's multipart parsing (``MultipartSerde``), both found by schemathesis:

    - a text value sent for a file field is taken as a URL and downloaded: a server-side request to
      wherever a client says (and a 500 when uvloop is missing). Here the text is the file's
      content instead, so it reaches our image decoder like any upload and is refused there (400)
      unless it is an image;
    - a malformed body raises Starlette's HTTPException(400) (or the parser's own error), which
      BentoML turned into a 500. Here it is a
      400 with the same body as any other invalid request (``{"error", "detail"}``).

    Called where the service module is imported, so that a failed check (RuntimeError) stops
    ``bentoml serve`` before it serves. The logger ``redact_request_errors`` filters is checked here
    too, for the same reason: that function itself runs later, in each worker. Calling it again is
    harmless: what is already ours is left as it is.
    """
    check_bentoml_version()
    request_error_logger()
    try:
        from _bentoml_impl import serde
    except ImportError as err:
        raise _refuse_patch("_bentoml_impl.serde", f"cannot be imported ({err})") from None
    from pydantic import ValidationError
    from python_multipart.exceptions import MultipartParseError
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    MultipartSerde = getattr(serde, "MultipartSerde", None)
    if not isinstance(MultipartSerde, type):
        raise _refuse_patch("_bentoml_impl.serde.MultipartSerde", "does not exist (renamed or moved?)")
    ensure_file = _original_method(MultipartSerde, "ensure_file", static=True)
    # The URL download happens in ensure_file only as long as parse_request calls it for file fields.
    parse_request = _original_method(MultipartSerde, "parse_request", static=False, must_use="ensure_file")
    if getattr(ensure_file, "_capt_patch", False) and getattr(parse_request, "_capt_patch", False):
        return

    @_ours(MultipartSerde.__dict__["ensure_file"])
    async def as_upload(value):
        if isinstance(value, UploadFile):
            return value
        data = str(value).encode()
        return UploadFile(io.BytesIO(data), size=len(data), filename="text-field")

    @_ours(parse_request)
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
    # What BentoML will find: ours, on every serde it parses forms with (it picks one per media type).
    serdes = getattr(serde, "ALL_SERDE", {})
    if serdes.get("multipart/form-data") is not MultipartSerde:
        raise _refuse_patch("_bentoml_impl.serde.ALL_SERDE['multipart/form-data']", "is not MultipartSerde")
    for media, cls in serdes.items():
        takes_files = hasattr(cls, "ensure_file")
        if takes_files and (cls.ensure_file is not as_upload or cls.parse_request is not parse_or_refuse):
            raise _refuse_patch(f"the serde for {media} ({cls.__qualname__})", "does not use the patched methods")


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


def request_error_logger(module_name: str = REQUEST_ERROR_MODULE,
                         app_module: str = SERVICE_APP_MODULE) -> logging.Logger:
    """The logger BentoML logs a refused request through, checked to be the one it really uses: the
    service app calls ``log_exception`` of ``module_name``, which logs on that module's
    ``logging.getLogger(__name__)``. Anything else raises RuntimeError: a filter on a logger that
    nobody logs through would let request content reach the log unnoticed."""
    try:
        module = importlib.import_module(module_name)
        app = importlib.import_module(app_module)
    except ImportError as err:
        raise _refuse_patch(f"module {err.name or module_name} (where BentoML logs request errors)",
                            "cannot be imported") from None
    found = getattr(module, "logger", None)
    if not isinstance(found, logging.Logger) or found is not logging.getLogger(module_name):
        raise _refuse_patch(f"{module_name}.logger", "is not logging.getLogger(__name__)")
    log_exception = getattr(module, "log_exception", None)
    if not (inspect.isfunction(log_exception) and log_exception.__globals__ is vars(module)
            and "logger" in _names_used(log_exception.__code__)):
        raise _refuse_patch(f"{module_name}.log_exception", "does not exist or does not log on the module's logger")
    if getattr(app, "log_exception", None) is not log_exception:
        raise _refuse_patch(f"{app_module}.log_exception", f"is not {module_name}.log_exception")
    return found


def redact_request_errors() -> None:
    """Filters BentoML's request error log (``_RedactValidationErrors``); once per process."""
    request_errors = request_error_logger()
    if not any(isinstance(f, _RedactValidationErrors) for f in request_errors.filters):
        request_errors.addFilter(_RedactValidationErrors())


# Where BentoML's request timeout lives (``traffic={"timeout": ...}`` adds it in front of every endpoint).
TIMEOUT_MODULE = "bentoml._internal.server.http.traffic"
TIMER_LEAK = "would keep every answered request in memory for the length of the timeout"


def cancel_request_timers() -> None:
    """BentoML's ``TimeoutMiddleware`` answers 504 when a response has not started within the
    service's timeout. It arms ``loop.call_later(timeout, ...)`` per request and never cancels it, so
    the timer, the request's future and its context (OpenTelemetry span and all) outlive the answer
    by the whole timeout (about 20 objects a request: at 330 requests/s and our 120 s, 40,000 requests
    and 800,000 objects in a steady state). Python's full garbage collections scan them with the rest
    of the heap: 250-320 ms pauses every ~3 s already within 20 s of load, during which no request was
    answered (measured on the default model, 2 cores). Here the timer runs in an empty
    context and is cancelled as soon as the response has started or the request is over, when it can
    no longer fire usefully; what it does while armed is BentoML's own ``_set_timer_out``. Checked like the patches above;
    calling it again is harmless."""
    check_bentoml_version()
    try:
        traffic = importlib.import_module(TIMEOUT_MODULE)
    except ImportError as err:
        raise _refuse_patch(TIMEOUT_MODULE, f"cannot be imported ({err})", TIMER_LEAK) from None
    middleware = getattr(traffic, "TimeoutMiddleware", None)
    what = f"{TIMEOUT_MODULE}.TimeoutMiddleware"
    if not isinstance(middleware, type):
        raise _refuse_patch(what, "does not exist (renamed or moved?)", TIMER_LEAK)
    original = middleware.__dict__.get("__call__")
    if getattr(original, "_capt_patch", False):
        return
    if not inspect.iscoroutinefunction(original) or original.__module__ != TIMEOUT_MODULE:
        raise _refuse_patch(f"{what}.__call__", "is not BentoML's own coroutine", TIMER_LEAK)
    missing = {"call_later", "_set_timer_out", "create_future", "timeout"} - _names_used(original.__code__)
    if missing or not inspect.isfunction(middleware.__dict__.get("_set_timer_out")):
        raise _refuse_patch(f"{what}.__call__", f"no longer arms a timer as it did (missing: {sorted(missing) or '_set_timer_out'})",
                            TIMER_LEAK)

    @_ours(original)
    async def call_with_cancelled_timer(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # An empty context: a cancelled timer keeps its context until the loop drops it from its heap
        # (lazily), and the request's context holds the span and everything else of the request.
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

        async def started(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
                timer.cancel()  # the response has started: the timeout cannot answer any more
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, started), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if task.cancel():
                from starlette.responses import JSONResponse
                response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                        status_code=504)
                await response(scope, receive, send)
        else:
            await task
        finally:
            timer.cancel()

    middleware.__call__ = call_with_cancelled_timer


def prepare_api_specs(service) -> None:
    """Every endpoint of a BentoML service (``service.apis``): unknown fields refused (400), not silently
    ignored (a misspelt "top_k" would otherwise pass); and each answer's media type worked out once.
    BentoML's ``mime_type()`` builds the output's JSON schema (a pydantic ``TypeAdapter``) for every
    response whose spec sets no ``media_type``: about a tenth of the event loop's time per request here.
    The computed value is stored as the spec's ``media_type``, which ``mime_type()`` returns first."""
    for api in service.apis.values():
        api.input_spec.model_config["extra"] = "forbid"
        api.input_spec.model_rebuild(force=True)
        output = api.output_spec
        if not hasattr(output, "media_type") or not callable(getattr(output, "mime_type", None)):
            raise _refuse_patch("an endpoint's output spec", "has no media_type or mime_type()",
                                "would build a JSON schema for every answer")
        if output.media_type is None:
            output.media_type = output.mime_type()
