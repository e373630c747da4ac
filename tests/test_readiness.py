"""Readiness that tells the truth: /readyz (BentoML's ``__is_ready__`` hook) answers 200 only while a
tiny classification through the served graphs works (``ServingModel.ready``), checked at most every
CAPT_READY_CACHE_S seconds."""
import logging
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from serving.model import Limits, ServingModel


@pytest.fixture(scope="module")
def model(default_bundle):
    return ServingModel(default_bundle, Limits(ready_cache_s=0), check_twin=False)


def broken(real, change):
    """An encoder (``ServingModel.encode_images``, whatever engine runs it, or ``encode_texts``) whose
    output goes through ``change``: an ONNX session that raises, or answers nonsense."""
    return lambda *args, **kwargs: change(real(*args, **kwargs))


def raises(_):
    raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a broken session")


@pytest.mark.parametrize("encoder,change,reason", [
    ("encode_images", raises, "a broken session"),
    ("encode_texts", raises, "a broken session"),
    ("encode_texts", lambda out: np.full_like(out, np.nan), "not finite"),
    ("encode_images", lambda out: out[:, :64], "shape"),
])
def test_a_model_that_cannot_answer_is_not_ready_and_says_why(model, monkeypatch, caplog, encoder, change, reason):
    assert model.ready() is True
    monkeypatch.setattr(model, encoder, broken(getattr(model, encoder), change))
    with caplog.at_level(logging.WARNING, logger="capt.serving"):
        assert model.ready() is False and model.ready() is False
        monkeypatch.undo()
        assert model.ready() is True
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not ready" in m for m in messages) == 1 and reason in messages[0]  # said once, with the reason
    assert any("ready again" in m for m in messages)


def test_the_check_s_outcome_is_reused_for_ready_cache_s(model, monkeypatch):
    monkeypatch.setattr(model, "limits", Limits(ready_cache_s=0.5))
    time.sleep(0.51)  # so that the last check of the tests before is stale
    calls = []
    encode = lambda pixels: calls.append(len(pixels)) or model.encode_images(pixels)  # noqa: E731
    assert model.ready(encode) and model.ready(encode) and calls == [1]  # the second answer is the cached one
    monkeypatch.setattr(model, "encode_images", broken(model.encode_images, raises))
    assert model.ready(encode) is True  # within the cache time a failure is not seen yet...
    time.sleep(0.6)
    assert model.ready(encode) is False  # ...and after it, it is


def test_the_service_s_hook_runs_the_check_through_the_image_batcher():
    from serving.service import Classifier
    seen = {}
    stub = SimpleNamespace(encode_images="the batcher",
                           model=SimpleNamespace(ready=lambda encode: seen.setdefault("encode", encode) and False))
    assert Classifier.inner.__is_ready__(stub) is False and seen["encode"] == "the batcher"


def test_live_readyz_is_200_and_runs_a_classification_once_its_cache_expires(server):
    from test_server import _histogram
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    time.sleep(5.1)  # CAPT_READY_CACHE_S, default 5
    before = _histogram(server, "capt_image_batch_size")
    assert [httpx.get(f"{server.url}/readyz").status_code for _ in range(3)] == [200] * 3
    after = _histogram(server, "capt_image_batch_size")
    assert after[0] - before[0] == 1  # one image-encoder batch (of the check's image) for three calls
