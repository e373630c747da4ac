"""Hugging Face's zero-shot image classification wire format, so that
``huggingface_hub.InferenceClient(model="http://HOST:PORT/hf/zero-shot-image-classification")
.zero_shot_image_classification(image, candidate_labels=[...])`` works against this server.

When ``model`` is a URL the client posts to that URL itself (provider "hf-inference", no route
added). What it has sent, by version (read from its source):

- 0.27 and later (2.4.0 is the version tested): ``{"inputs": "<base64 of the file>", "parameters":
  {"candidate_labels": ["a", "b"], "hypothesis_template": "..."}}``, the template only when given;
- 0.26: ``{"inputs": {"image": "<base64>", "candidateLabels": "a,b"}, "parameters":
  {"hypothesis_template": "..."}}``;
- 0.16 to 0.25: ``{"image": "<base64>", "parameters": {"candidate_labels": "a,b"}}``.

All three are accepted (labels as a list or one comma-separated string; the comma-joined forms cannot
carry a label with a comma in it). The answer is HF's: a bare JSON list of ``{"label", "score"}``,
every label, by score, highest first. What does not fit in that body is said in headers:
``X-Capt-Templates-Applied`` (``true`` only when the hypothesis template shaped the class embeddings:
a bundle with learned text prompts accepts and ignores it, and ``X-Capt-Templates-Note`` says why)
and ``X-Capt-Label-Cache-Hit``. Without a template the bundle's own prompt is used, not HF's default
"This is a photo of {}.". Refusals keep HF's shape, ``{"error": "..."}`` with a 4xx. An image given as
an http(s) URL is refused (400), never fetched: the client downloads URLs itself and sends the bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import ClientError, RequestError, error_response
from .images import decode_base64_image, refuse_image_url

MOUNT = "/hf"
ROUTE = "/zero-shot-image-classification"
TOP_LEVEL_FIELDS = ("inputs", "image", "parameters", "options")
PARAMETER_FIELDS = ("candidate_labels", "hypothesis_template")
INPUT_FIELDS = ("image", "candidate_labels", "candidateLabels")
SHAPE = '{"inputs": "<base64 image>", "parameters": {"candidate_labels": ["a", "b"]}}'


@dataclass(frozen=True)
class ZeroShotRequest:
    image: str  # base64, or a data URL
    labels: list[str]
    template: str | None


def _fields(value: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{where} must be a JSON object, got {type(value).__name__}; send {SHAPE}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) in {where}: {', '.join(map(repr, unknown))} (known: {', '.join(allowed)})")
    return value


def _labels(value: Any) -> list[str]:
    if isinstance(value, str):  # the comma-joined form of huggingface_hub 0.16 to 0.26
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        raise RequestError("candidate_labels must be a list of strings or one comma-separated string")
    if len(value) < 2:
        raise RequestError(f"give at least 2 candidate_labels, got {len(value)}")
    return value


def parse_zero_shot(body: Any) -> ZeroShotRequest:
    """Any of the payloads above -> image, labels and template; a RequestError (400) says what is wrong."""
    body = _fields(body, TOP_LEVEL_FIELDS, "the body")
    parameters = {} if body.get("parameters") is None else _fields(body["parameters"], PARAMETER_FIELDS, "parameters")
    if ("inputs" in body) == ("image" in body):
        raise RequestError(f"give the image once, as 'inputs' (or 'image', in older clients); send {SHAPE}")
    inputs = body["inputs"] if "inputs" in body else body["image"]
    labels = [parameters[name] for name in ("candidate_labels",) if parameters.get(name) is not None]
    if isinstance(inputs, dict):  # huggingface_hub 0.26: {"image": ..., "candidateLabels": "a,b"}
        inputs = _fields(inputs, INPUT_FIELDS, "inputs")
        labels += [inputs[name] for name in ("candidate_labels", "candidateLabels") if inputs.get(name) is not None]
        inputs = inputs.get("image")
    if not isinstance(inputs, str) or not inputs:
        raise RequestError(f"the image must be a base64 string (one image per request); send {SHAPE}")
    refuse_image_url(inputs)
    if not labels:
        raise RequestError(f"candidate_labels are required; send {SHAPE}")
    if len(labels) > 1:
        raise RequestError("candidate_labels given twice (in inputs and in parameters)")
    template = parameters.get("hypothesis_template")
    if template is not None and not isinstance(template, str):
        raise RequestError("hypothesis_template must be a string with one '{}'")
    return ZeroShotRequest(inputs, _labels(labels[0]), template)


def answer(classified: dict) -> tuple[list[dict], dict[str, str]]:
    """One image's classify answer (every label ranked) -> HF's body and our headers."""
    scores = [{"label": p["label"], "score": p["probability"]} for p in classified["predictions"][0]]
    headers = {"X-Capt-Templates-Applied": str(classified["templates_applied"]).lower(),
               "X-Capt-Label-Cache-Hit": str(classified["label_cache_hit"]).lower()}
    if classified.get("templates_note"):
        headers["X-Capt-Templates-Note"] = classified["templates_note"]
    return scores, headers


def classify(service, request: ZeroShotRequest) -> tuple[list[dict], dict[str, str]]:
    """``service``: the Classifier instance (its model's limits, and its classify path with the shared
    image batcher and the label-cache metrics)."""
    limits = service.model.limits
    image = decode_base64_image(request.image, limits.max_upload_bytes, limits.max_image_pixels)
    templates = [request.template] if request.template is not None else None
    return answer(service._classify([image], request.labels, templates, None))


async def json_body(request: Request) -> Any:
    """The request's JSON (its size is bounded by BodySizeLimit in front of every endpoint)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise RequestError("the body is not JSON") from None


def create_app(service: Callable[[], Any]) -> Starlette:
    """The ASGI app to mount at ``MOUNT``; ``service()`` gives the running Classifier instance."""
    async def zero_shot(request: Request):
        try:
            parsed = parse_zero_shot(await json_body(request))
            scores, headers = await run_in_threadpool(classify, service(), parsed)
        except ClientError as err:
            return error_response(err)
        return JSONResponse(scores, headers=headers)

    return Starlette(routes=[Route(ROUTE, zero_shot, methods=["POST"])])
