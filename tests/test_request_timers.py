"""serving.middleware.cancel_request_timers: BentoML's request timeout stops holding an answered
request (its context, futures and whatever they reference) for the whole timeout, still answers 504
when a response does not start in time, and fails closed on a release that changed what it patches."""
import asyncio
import contextvars
import gc
import importlib
import json
import weakref

import pytest

from serving import middleware
from serving.middleware import TIMEOUT_MODULE, cancel_request_timers

traffic = importlib.import_module(TIMEOUT_MODULE)
REAL_CALL = getattr(traffic.TimeoutMiddleware.__call__, "_capt_original", traffic.TimeoutMiddleware.__call__)
REQUEST_STATE = contextvars.ContextVar("request_state")  # what a tracing span looks like to the timer


class RequestState:
    """Stands for the span and the rest of a request's context; weakly referenceable."""


@pytest.fixture
def bentoml_timeout(monkeypatch):
    """BentoML's own TimeoutMiddleware.__call__; whatever the test patches is put back after it."""
    monkeypatch.setattr(traffic.TimeoutMiddleware, "__call__", REAL_CALL)
    return traffic.TimeoutMiddleware


async def _answer(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _request(middleware_class, app, timeout: float) -> tuple[list[dict], weakref.ref]:
    """One HTTP request through ``middleware_class(app, timeout)`` in a context holding a fresh
    RequestState; (messages sent, a weak reference to that state)."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def one_request():
        state = RequestState()
        REQUEST_STATE.set(state)
        await middleware_class(app, timeout=timeout)({"type": "http"}, receive, send)
        return weakref.ref(state)

    # A task of its own, as the server gives each request: its context is a copy, gone when it ends.
    reference = await asyncio.create_task(one_request())
    return sent, reference


def _alive_after_answer(middleware_class) -> bool:
    """Whether the request's state is still referenced once it was answered, the loop still running
    and the 60 s timeout far from elapsed."""
    async def main():
        sent, reference = await _request(middleware_class, _answer, timeout=60)
        assert sent[0]["status"] == 200
        await asyncio.sleep(0)  # off the stack of the callback that resumed us, which holds the request's task
        gc.collect()
        return reference() is not None
    return asyncio.run(main())


def test_an_answered_request_is_released_at_once(bentoml_timeout):
    # BentoML's own middleware keeps it for the length of the timeout: what the patch is for.
    assert _alive_after_answer(bentoml_timeout)
    cancel_request_timers()
    assert bentoml_timeout.__call__._capt_original is REAL_CALL
    assert not _alive_after_answer(bentoml_timeout)


def test_a_response_that_does_not_start_in_time_still_gets_504(bentoml_timeout):
    cancel_request_timers()

    async def slow(scope, receive, send):
        await asyncio.sleep(5)
        await _answer(scope, receive, send)

    sent, _ = asyncio.run(_request(bentoml_timeout, slow, timeout=0.05))
    assert sent[0]["status"] == 504
    assert "0.05 seconds" in json.loads(sent[1]["body"])["error"]


def test_a_second_call_patches_nothing_twice(bentoml_timeout):
    cancel_request_timers()
    patched = bentoml_timeout.__call__
    cancel_request_timers()
    assert bentoml_timeout.__call__ is patched


async def _call_without_timer(self, scope, receive, send):  # a release that times requests otherwise
    await self.app(scope, receive, send)


_call_without_timer.__module__ = TIMEOUT_MODULE


def _not_a_coroutine(self, scope, receive, send):
    return None


@pytest.mark.parametrize("replacement, message", [
    (_call_without_timer, "no longer arms a timer"),
    (_not_a_coroutine, "is not BentoML's own coroutine"),
])
def test_a_changed_timeout_middleware_stops_the_patch(bentoml_timeout, monkeypatch, replacement, message):
    monkeypatch.setattr(bentoml_timeout, "__call__", replacement)
    with pytest.raises(RuntimeError, match=message):
        cancel_request_timers()


def test_a_missing_timeout_middleware_stops_the_patch(monkeypatch):
    monkeypatch.delattr(traffic, "TimeoutMiddleware")
    with pytest.raises(RuntimeError, match="TimeoutMiddleware does not exist"):
        cancel_request_timers()


def test_the_served_app_uses_the_patched_middleware():
    """The services import the patch: the middleware BentoML puts in front of every endpoint is ours."""
    import serving.service  # noqa: F401 - applies the patches as `bentoml serve` does
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    assert TimeoutMiddleware.__call__.__module__ == middleware.__name__
