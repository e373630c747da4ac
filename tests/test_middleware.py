"""The BentoML patches in serving/middleware.py fail closed: a release that renamed or moved what
they patch stops the server instead of serving with the hole open."""
import asyncio
import logging
import re
import sys
import types
from pathlib import Path

import pytest
from _bentoml_impl import serde

from serving import middleware
from serving.middleware import (ALLOW_UNVERIFIED_ENV, REQUEST_ERROR_MODULE, VERIFIED_BENTOML_VERSIONS,
                                check_bentoml_version, harden_multipart, redact_request_errors, request_error_logger)

PATCHED = ("ensure_file", "parse_request")
REAL = {name: serde.MultipartSerde.__dict__[name] for name in PATCHED}


def _bentoml_own(name):
    """BentoML's attribute, also when an import of serving.service in this process patched it already."""
    attribute = REAL[name]
    function = attribute.__func__ if isinstance(attribute, staticmethod) else attribute
    return getattr(function, "_capt_original", attribute)


@pytest.fixture
def bentoml_multipart(monkeypatch):
    """The real MultipartSerde as BentoML ships it; whatever the test patches is put back after it."""
    for name in PATCHED:
        monkeypatch.setattr(serde.MultipartSerde, name, _bentoml_own(name))
    return serde.MultipartSerde


def test_the_real_multipart_serde_is_patched_with_ours(bentoml_multipart):
    assert bentoml_multipart.parse_request.__module__ == "_bentoml_impl.serde"
    harden_multipart()
    ensure_file = bentoml_multipart.__dict__["ensure_file"]
    assert isinstance(ensure_file, staticmethod) and ensure_file.__func__.__module__ == "serving.middleware"
    assert bentoml_multipart.parse_request.__module__ == "serving.middleware"
    assert bentoml_multipart.parse_request._capt_original is _bentoml_own("parse_request")
    # A URL given for a file field is the upload's content, not something to fetch.
    upload = asyncio.run(bentoml_multipart.ensure_file("http://127.0.0.1:9/cat.png"))
    assert asyncio.run(upload.read()) == b"http://127.0.0.1:9/cat.png"
    patched = bentoml_multipart.parse_request
    harden_multipart()  # a second call (the service module imported twice) wraps nothing twice
    assert bentoml_multipart.parse_request is patched


# What a BentoML release could have done to the two methods; each must stop the patch.
def _download(obj):  # a module-level function of ours, not BentoML's static method
    return obj


async def _parse_without_ensure_file(self, request, cls):  # the download moved somewhere else
    return cls.model_validate(dict(await request.form()))


_parse_without_ensure_file.__module__ = "_bentoml_impl.serde"
_parse_without_ensure_file.__qualname__ = "MultipartSerde.parse_request"


@pytest.mark.parametrize("changed,replacement,message", [
    ("ensure_file", None, r"MultipartSerde\.ensure_file does not exist \(renamed or moved\?\)"),
    ("parse_request", None, r"MultipartSerde\.parse_request does not exist \(renamed or moved\?\)"),
    ("ensure_file", _download, r"MultipartSerde\.ensure_file is no longer a static method"),
    ("ensure_file", staticmethod(_download), r"MultipartSerde\.ensure_file is test_middleware\._download, not BentoML's own"),
    ("parse_request", _parse_without_ensure_file, r"MultipartSerde\.parse_request no longer calls ensure_file"),
], ids=["ensure_file-renamed", "parse_request-renamed", "ensure_file-not-static", "ensure_file-replaced",
        "parse_request-no-ensure_file"])
def test_a_changed_multipart_serde_stops_the_patch(monkeypatch, changed, replacement, message):
    attributes = {name: _bentoml_own(name) for name in PATCHED}
    if replacement is None:
        del attributes[changed]
    else:
        attributes[changed] = replacement
    # A stand-in of the same name, subclassing what the real one does, in place of the real one.
    fake = type("MultipartSerde", (serde.JSONSerde,), {"media_type": "multipart/form-data", **attributes})
    monkeypatch.setattr(serde, "MultipartSerde", fake)
    with pytest.raises(RuntimeError, match=message) as refused:
        harden_multipart()
    assert f"BentoML {middleware._bentoml_version()}" in str(refused.value)
    assert fake.__dict__.get(changed) is attributes.get(changed)  # nothing was patched in


def test_a_missing_multipart_serde_stops_the_patch(monkeypatch):
    monkeypatch.delattr(serde, "MultipartSerde")
    with pytest.raises(RuntimeError, match=r"_bentoml_impl\.serde\.MultipartSerde does not exist"):
        harden_multipart()


def test_a_form_serde_that_bypasses_the_patch_stops_it(monkeypatch, bentoml_multipart):
    class FormSerde(bentoml_multipart):  # its own parse_request, as a release could add for urlencoded forms
        async def parse_request(self, request, cls):
            return await super().parse_request(request, cls)
    monkeypatch.setitem(serde.ALL_SERDE, "application/x-www-form-urlencoded", FormSerde)
    with pytest.raises(RuntimeError, match=r"serde for application/x-www-form-urlencoded \(.*FormSerde\) does not use"):
        harden_multipart()


def test_the_installed_and_pinned_bentoml_are_the_verified_ones():
    pins = re.findall(r"^bentoml==(\S+)", (Path(__file__).parent.parent / "requirements.txt").read_text(), re.M)
    assert pins and set(pins) <= set(VERIFIED_BENTOML_VERSIONS)
    assert check_bentoml_version() in VERIFIED_BENTOML_VERSIONS


def test_an_unverified_bentoml_is_refused_unless_allowed(monkeypatch, bentoml_multipart, caplog):
    monkeypatch.setattr(middleware, "_bentoml_version", lambda: "1.4.99")
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=rf"BentoML 1\.4\.99 .*{ALLOW_UNVERIFIED_ENV}=1"):
        harden_multipart()
    assert bentoml_multipart.parse_request is _bentoml_own("parse_request")  # refused before patching
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="capt.serving"):
        assert check_bentoml_version() == "1.4.99"
    assert "BentoML 1.4.99" in caplog.text


def test_the_filtered_logger_is_the_one_bentoml_logs_request_errors_through():
    assert request_error_logger() is logging.getLogger(REQUEST_ERROR_MODULE)


def test_a_missing_logger_module_stops_the_redaction():
    with pytest.raises(RuntimeError, match=r"bentoml\._internal\.server\.no_such_app .*cannot be imported"):
        request_error_logger("bentoml._internal.server.no_such_app")


def _fake_http_app(monkeypatch, source: str) -> str:
    module = types.ModuleType("capt_fake_http_app")
    exec(source, vars(module))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


@pytest.mark.parametrize("source,message", [
    ("import logging\nlogger = logging.getLogger('bentoml.elsewhere')\n", r"logger is not logging\.getLogger\(__name__\)"),
    ("import logging\nlogger = logging.getLogger(__name__)\n"
     "def log_exception(request):\n    logging.getLogger('bentoml.elsewhere').error('x')\n",
     r"log_exception does not exist or does not log on the module's logger"),
    ("import logging\nlogger = logging.getLogger(__name__)\n"
     "def log_exception(request):\n    logger.error('x')\n",
     r"_bentoml_impl\.server\.app\.log_exception is not capt_fake_http_app\.log_exception"),
], ids=["other-logger", "logs-elsewhere", "app-logs-elsewhere"])
def test_a_logger_bentoml_does_not_log_through_stops_the_redaction(monkeypatch, source, message):
    with pytest.raises(RuntimeError, match=message):
        request_error_logger(_fake_http_app(monkeypatch, source))


def test_the_redaction_filter_is_added_once(monkeypatch):
    logger = logging.getLogger(REQUEST_ERROR_MODULE)
    monkeypatch.setattr(logger, "filters", [])
    redact_request_errors()
    redact_request_errors()
    assert [type(f) for f in logger.filters] == [middleware._RedactValidationErrors]


def test_each_answers_media_type_is_worked_out_once_and_is_what_bentoml_would_compute(monkeypatch):
    from serving.service import Classifier
    for name, api in Classifier.apis.items():
        spec = api.output_spec
        stored = spec.media_type
        assert stored is not None, name
        with monkeypatch.context() as patched:
            patched.setattr(spec, "media_type", None)
            assert spec.mime_type() == stored, name  # BentoML's own answer, from the JSON schema
        with monkeypatch.context() as patched:
            patched.setattr(spec, "model_json_schema", classmethod(lambda cls, *a, **k: pytest.fail("schema per answer")))
            assert spec.mime_type() == stored, name
