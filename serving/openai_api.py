"""OpenAI's embeddings wire format, so that ``openai.OpenAI(base_url="http://HOST:PORT/v1",
api_key=KEY).embeddings.create(model=..., input=[...])`` gives this model's text embeddings, and with
``extra_body={"modality": "image"}`` (the convention of the infinity embedding server) its image
embeddings of base64 images or data URLs.

- ``POST /v1/embeddings``: ``model`` (the served model's name, ``GET /v1/models``; another name is a 404
  ``model_not_found``), ``input`` (a string or a list of strings; token-id arrays are refused),
  ``encoding_format`` (``float``, the API's default, or ``base64``: little-endian float32, which the
  openai Python client asks for when no format is given and decodes itself), ``dimensions`` (accepted
  only when equal to the embedding size: these embeddings cannot be shortened), ``user`` (ignored),
  ``modality`` (``text`` or ``image``).
- Text inputs are embedded as ``/embed_text`` embeds labels (through the model's prompt, the same
  numbers), so that they compare with image embeddings; repeated inputs are embedded once.
  ``usage.prompt_tokens`` counts the token ids the text encoder ran on (``ServingModel.count_tokens``);
  images count 0 tokens.
- Image inputs give ``/embed_image``'s numbers. An http(s) URL is refused (400), never fetched.
- Refusals are in OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``; more requests
  at once than ``CAPT_MAX_CONCURRENT_EMBEDDINGS`` are refused with 429 and ``Retry-After``.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from export.bundle import MANIFEST

from .errors import Busy, ClientError
from .huggingface import json_body
from .images import decode_base64_image, refuse_image_url
from .model import validate_labels

MOUNT = "/v1"
FIELDS = ("model", "input", "encoding_format", "dimensions", "user", "modality")
MODALITIES = ("text", "image")
ENCODING_FORMATS = ("float", "base64")
OWNED_BY = "capt"
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """A refusal in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_client_error(cls, err: ClientError, param: str | None = None) -> "OpenAIError":
        if isinstance(err, Busy):
            return cls(str(err), 429, None, "rate_limit_exceeded", "rate_limit_error")
        return cls(str(err), int(err.status), param)


@dataclass(frozen=True)
class EmbeddingsRequest:
    inputs: list[str]
    modality: str
    encoding_format: str


def parse_embeddings(body: Any, served_model: str, dim: int, max_texts: int, max_images: int) -> EmbeddingsRequest:
    """An embeddings request body -> what to embed; an OpenAIError says what is wrong."""
    if not isinstance(body, dict):
        raise OpenAIError("the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise OpenAIError(f"unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("you must provide a model (GET /v1/models lists it)", param="model")
    if model != served_model:
        raise OpenAIError(f"The model {model!r} does not exist: this server serves {served_model!r}", 404,
                          "model", "model_not_found")
    modality = body.get("modality", "text")
    if modality not in MODALITIES:
        raise OpenAIError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}", param="modality")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise OpenAIError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}",
                          param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or dimensions != dim):
        raise OpenAIError(f"dimensions must be {dim}, this model's embedding size (its embeddings cannot be "
                          f"shortened), got {dimensions!r}", param="dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise OpenAIError("user must be a string", param="user")
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise OpenAIError("input must be a string or a non-empty list of strings", param="input")
    if not all(isinstance(item, str) for item in inputs):
        if all(isinstance(item, int) or isinstance(item, list) for item in inputs):
            raise OpenAIError("token-id arrays are not supported (this model has its own tokenizer): send the "
                              "text itself (with LangChain's OpenAIEmbeddings, check_embedding_ctx_length=False)",
                              param="input")
        raise OpenAIError("input must be a string or a list of strings", param="input")
    limit = max_images if modality == "image" else max_texts
    if len(inputs) > limit:
        raise OpenAIError(f"too many inputs: {len(inputs)} > {limit}", param="input")
    for index, item in enumerate(inputs):
        if not item.strip():
            raise OpenAIError(f"input[{index}] is empty", param="input")
        if modality == "image":
            try:
                refuse_image_url(item)
            except ClientError as err:
                raise OpenAIError(f"input[{index}]: {err}", param="input") from None
    return EmbeddingsRequest(inputs, modality, encoding_format)


def embed(service, request: EmbeddingsRequest) -> tuple[np.ndarray, list[int]]:
    """(embeddings [N, D], tokens per input) through the same paths as ``/embed_text`` and
    ``/embed_image``; ``service`` is the Classifier instance."""
    model, limits = service.model, service.model.limits
    if request.modality == "image":
        images = [decode_base64_image(item, limits.max_upload_bytes, limits.max_image_pixels) for item in request.inputs]
        return np.asarray(service.encode_images(model.pixels(images))), [0] * len(images)
    texts = [item.strip() for item in request.inputs]
    unique = list(dict.fromkeys(texts))
    labels, _ = validate_labels(unique, None, limits)
    embeddings, hit = model.cached_class_embeddings(labels)
    service._count_label_lookup(hit)
    row = {label: i for i, label in enumerate(labels)}
    tokens = dict(zip(labels, model.count_tokens(labels)))
    return np.asarray(embeddings)[[row[t] for t in texts]], [tokens[t] for t in texts]


def embeddings_answer(embeddings: np.ndarray, tokens: list[int], model: str, encoding_format: str) -> dict:
    def encoded(vector: np.ndarray):
        vector = np.asarray(vector, dtype="<f4")
        return base64.b64encode(vector.tobytes()).decode("ascii") if encoding_format == "base64" else vector.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(embeddings)],
            "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


def _error(err: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def create_app(service: Callable[[], Any]) -> Starlette:
    """The ASGI app to mount at ``MOUNT``. ``service()`` gives the running Classifier instance, which has
    ``model``, ``encode_images``, ``served_model_name``, ``embedding_slots`` (a semaphore bounding the
    requests in flight) and ``_count_label_lookup``."""

    def run(svc, request: EmbeddingsRequest) -> dict:
        if not svc.embedding_slots.acquire(blocking=False):
            raise Busy(f"{svc.model.limits.max_concurrent_embeddings} embeddings requests are already running "
                       f"(CAPT_MAX_CONCURRENT_EMBEDDINGS); retry later")
        try:
            embeddings, tokens = embed(svc, request)
        finally:
            svc.embedding_slots.release()
        return embeddings_answer(embeddings, tokens, svc.served_model_name, request.encoding_format)

    async def embeddings(request: Request):
        svc = service()
        limits = svc.model.limits
        try:
            try:
                body = await json_body(request)
            except ClientError as err:
                raise OpenAIError.from_client_error(err) from None
            parsed = parse_embeddings(body, svc.served_model_name, svc.model.embedding_dim, limits.max_labels,
                                      limits.max_images)
            try:
                return JSONResponse(await run_in_threadpool(run, svc, parsed))
            except ClientError as err:  # an input the model refuses (an image, a label too long), or Busy
                raise OpenAIError.from_client_error(err, param=None if isinstance(err, Busy) else "input") from None
        except OpenAIError as err:
            return _error(err)

    def card(svc) -> dict:
        created = int(os.stat(svc.model.bundle_dir / MANIFEST).st_mtime)
        return model_card(svc.served_model_name, created)

    async def list_models(request: Request):
        return JSONResponse({"object": "list", "data": [card(service())]})

    async def retrieve_model(request: Request):
        svc = service()
        if request.path_params["model"] != svc.served_model_name:
            return _error(OpenAIError(f"The model {request.path_params['model']!r} does not exist: this server "
                                      f"serves {svc.served_model_name!r}", 404, "model", "model_not_found"))
        return JSONResponse(card(svc))

    async def unknown(request: Request):
        return _error(OpenAIError(f"unknown endpoint {request.method} {request.url.path}: this server has "
                                  f"POST /v1/embeddings, GET /v1/models and GET /v1/models/<id>", 404,
                                  code="unknown_url"))

    return Starlette(routes=[Route("/embeddings", embeddings, methods=["POST"]),
                             Route("/models", list_models, methods=["GET"]),
                             Route("/models/{model:path}", retrieve_model, methods=["GET"]),
                             Route("/{path:path}", unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])])
