"""The BentoML service: zero-shot classification with label sets given per request, embeddings,
and an online PGD probe that reports how robust a prediction is.

Run it with ``make serve`` (or ``bentoml serve serving.service:Classifier``). The model is an
exported bundle: ``CAPT_BUNDLE`` (a folder) or ``CAPT_MODEL_TAG`` (BentoML model store tag,
default ``capt-default:latest``). Image encoding runs in ``ImageEncoder``, a batchable service
reached through ``bentoml.depends``, so concurrent requests share ONNX Runtime batches.
"""
from __future__ import annotations

import logging
import os
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, Field

from export.bundle import bundle_path_from_store

from .images import ImageRejected, decode_base64_image
from .model import Busy, Limits, RequestError, ServingModel

logger = logging.getLogger("capt.serving")
DEFAULT_TAG = "capt-default:latest"


def bundle_dir() -> Path:
    if os.environ.get("CAPT_BUNDLE"):
        return Path(os.environ["CAPT_BUNDLE"])
    return bundle_path_from_store(os.environ.get("CAPT_MODEL_TAG", DEFAULT_TAG))


class TooManyProbes(BentoMLException):
    error_code = HTTPStatus.TOO_MANY_REQUESTS


class ClassifyJSON(BaseModel):
    """``classify_json`` body: images as base64 strings (optionally data URLs)."""
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    templates: list[str] | None = None
    top_k: int = 5


def _client_error(err: Exception) -> InvalidArgument:
    return InvalidArgument(str(err))


@bentoml.service(name="capt-image-encoder", traffic={"timeout": 60})
class ImageEncoder:
    """ONNX image encoder with adaptive batching across requests."""

    def __init__(self) -> None:
        from export.onnx_export import IMAGE_ONNX, onnx_session
        self.session = onnx_session(bundle_dir() / IMAGE_ONNX)
        logger.info("image encoder on %s", self.session.get_providers()[0])

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=50)
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": pixels.astype(np.float32)})[0]


@bentoml.service(name="capt", traffic={"timeout": 120, "max_concurrency": 64})
class Classifier:
    image_encoder = bentoml.depends(ImageEncoder)

    def __init__(self) -> None:
        self.model = ServingModel(bundle_dir(), Limits.from_env())
        provider = self.model.provider
        if provider != "CUDAExecutionProvider":
            logger.warning("ONNX Runtime runs on %s (no CUDA provider available)", provider)
        self.cache_hits = bentoml.metrics.Counter(name="capt_label_cache_hits", documentation="label-set cache hits")
        self.cache_misses = bentoml.metrics.Counter(name="capt_label_cache_misses", documentation="label-set cache misses")
        self.probes = bentoml.metrics.Counter(name="capt_probes", documentation="probes run", labelnames=["flipped"])
        self.probe_seconds = bentoml.metrics.Histogram(name="capt_probe_seconds", documentation="probe time",
                                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))

    def _classify(self, images: list[Image], labels: list[str], templates: list[str] | None, top_k: int) -> dict:
        hits, misses = self.model.label_cache.hits, self.model.label_cache.misses
        try:
            ranked = self.model.classify(images, labels, templates, top_k, encode=self.image_encoder.encode)
        except (RequestError, ImageRejected) as err:
            raise _client_error(err) from err
        self.cache_hits.inc(self.model.label_cache.hits - hits)
        self.cache_misses.inc(self.model.label_cache.misses - misses)
        return {"predictions": ranked, "label_cache_hit": self.model.label_cache.hits > hits}

    def _decode(self, images: list[Image]) -> list[Image]:
        limits = self.model.limits
        for image in images:
            if image.width * image.height > limits.max_image_pixels:
                raise InvalidArgument(f"image of {image.width}x{image.height} pixels is over the limit")
        return [image.convert("RGB") for image in images]

    @bentoml.api
    def classify(self, images: list[Image], labels: list[str], templates: list[str] | None = None, top_k: int = 5) -> dict:
        """Multipart upload: one or more images and a label set -> labels ranked per image."""
        return self._classify(self._decode(images), labels, templates, top_k)

    @bentoml.api
    def classify_json(self, request: ClassifyJSON) -> dict:
        """The same with base64 images in a JSON body."""
        limits = self.model.limits
        try:
            images = [decode_base64_image(text, limits.max_upload_bytes, limits.max_image_pixels) for text in request.images]
        except ImageRejected as err:
            raise _client_error(err) from err
        return self._classify(images, request.labels, request.templates, request.top_k)

    @bentoml.api
    def embed_image(self, images: list[Image]) -> dict:
        pixels = self.model.pixels(self._decode(images))
        return {"embeddings": np.asarray(self.image_encoder.encode(pixels)).tolist()}

    @bentoml.api
    def embed_text(self, labels: list[str], templates: list[str] | None = None) -> dict:
        try:
            return {"embeddings": self.model.class_embeddings(*_validated(labels, templates, self.model.limits)).tolist()}
        except RequestError as err:
            raise _client_error(err) from err

    @bentoml.api
    def probe(self, image: Image, labels: list[str], true_label: str | None = None, eps: float = 4 / 255,
              steps: int = 10, step_size: float | None = None, restarts: int = 1, seed: int = 0,
              return_images: bool = False, search_eps: bool = False) -> dict:
        """PGD (L∞, pixel space) against the served model's prompted PyTorch twin: clean and
        adversarial predictions, margins, whether the prediction flipped and whether the
        adversarial image also fools the served ONNX graph."""
        try:
            result = self.model.probe(self._decode([image])[0], labels, true_label, eps, steps, step_size, restarts,
                                      seed, return_images, search_eps)
        except RequestError as err:
            raise _client_error(err) from err
        except Busy as err:
            raise TooManyProbes(str(err)) from err
        self.probes.labels(flipped=str(result["flipped"]).lower()).inc()
        self.probe_seconds.observe(result["time_ms"] / 1000)
        return result

    @bentoml.api(route="/info")
    def info(self) -> dict:
        return self.model.info()


def _validated(labels, templates, limits):
    from .model import validate_labels
    return validate_labels(labels, templates, limits)
