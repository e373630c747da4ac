"""The BentoML service: zero-shot classification with label sets given per request, embeddings,
and an online PGD probe that reports how robust a prediction is.

Run it with ``make serve`` (or ``bentoml serve serving.service:Classifier``). The model is an
exported bundle: ``CAPT_BUNDLE`` (a folder) or ``CAPT_MODEL_TAG`` (BentoML model store tag,
default ``capt-default:latest``). Concurrent requests share ONNX Runtime batches of the image
encoder through an in-process ``MicroBatcher`` (see ``serving/batching.py`` for why not a
separate batchable service).

Every refusal is a 4xx (or 503 for a probe past its time limit) with a JSON body ``{"error": ...}``.
Hugging Face's zero-shot wire format is mounted at ``/hf`` (``serving/huggingface.py``), OpenAI's
embeddings at ``/v1`` (``serving/openai_api.py``); optional API keys: ``serving/auth.py``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Literal

import anyio
import anyio.to_thread
import bentoml
import numpy as np
from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from capt import default_model
from export.bundle import BundleError, bundle_path_from_store, load_bundle, verify_bundle

from . import huggingface, openai_api
from .auth import ApiKeyAuth, describe as describe_api_keys, load_api_keys
from .batching import MicroBatcher
from .errors import ClientError, RequestError, error_response
from .images import decode_base64_image, decodes_inline, load_upload, open_upload, read_upload, reads_inline
from .heap import freeze_startup_heap
from .middleware import BodySizeLimit, MultipartBoundaryRequired, cancel_request_timers, harden_multipart, \
    prepare_api_specs, redact_request_errors
from .model import DEFAULT_ATTACK, Limits, ServingModel, validate_labels
from .sockets import spread_connections, spreading_requested

logger = logging.getLogger("capt.serving")
# What a start chose and did (the image engine and why, a kept choice recalled, the engine cache swept)
# is logged at INFO, as BentoML's own start-up lines are; the root logger would show warnings only.
# Nothing is logged at INFO per request.
logging.getLogger("capt").setLevel(logging.INFO)
# Read where the module is imported: an empty key or key file stops `bentoml serve` at start.
API_KEYS = load_api_keys()
CLASSIFY_THREADS = 16  # as many as the sync endpoints' pool (threads=16 below)


def bundle_dir() -> Path:
    """The bundle to serve, verified: a tampered or incomplete one stops the server at start with a
    message that names the bad file."""
    if os.environ.get("CAPT_BUNDLE"):
        path = Path(os.environ["CAPT_BUNDLE"])
        verify_bundle(path)
        return path
    return bundle_path_from_store(os.environ.get("CAPT_MODEL_TAG", default_model.STORE_TAG))


class ClassifyJSON(BaseModel):
    """``classify_json`` body: images as base64 strings (optionally data URLs)."""
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    templates: list[str] | None = None
    top_k: int = 5


def http_parser() -> str:
    """The HTTP implementation uvicorn runs this worker with: it imports only the one it chose
    (httptools where installed, else h11's pure Python)."""
    loaded = [name for name in ("httptools", "h11") if f"uvicorn.protocols.http.{name}_impl" in sys.modules]
    return loaded[0] if len(loaded) == 1 else "unknown"


def _answer(work: Callable[[], dict]) -> dict | JSONResponse:
    """Runs an endpoint's work; a ClientError becomes its status with ``{"error": message}``."""
    try:
        return work()
    except ClientError as err:
        return error_response(err)  # {"error": message}, with Retry-After on a 429


# Sync endpoints (all but /classify) run on a thread pool that BentoML sizes to 1 by default: one probe
# would then hold up every classify_json or embedding request behind it. Probes are bounded separately
# (max_concurrent_probes).
@bentoml.service(name="capt", traffic={"timeout": 120, "max_concurrency": 64}, threads=16)
class Classifier:
    @bentoml.on_deployment
    def check_bundle() -> None:
        """Once, before any worker starts: a bad bundle stops ``bentoml serve`` here with the file's
        name, instead of workers failing and being restarted forever. Bad means a file that does not
        match the manifest, or a probe twin that does not compute what the ONNX graphs compute."""
        try:
            load_bundle(bundle_dir(), ["CPUExecutionProvider"], check=True)
        except bentoml.exceptions.NotFound as err:
            raise SystemExit(f"refusing to serve: {err}. Export one with `capt export` or run "
                             f"`python -m serving.prepare` for the default model.") from None
        except BundleError as err:
            logger.error("refusing to serve: %s", err)
            raise SystemExit(f"refusing to serve: {err}") from None

    def __init__(self) -> None:
        redact_request_errors()
        self.model = ServingModel(bundle_dir(), Limits.from_env(), check_twin=False)  # check_bundle did
        self.batch_sizes = bentoml.metrics.Histogram(name="capt_image_batch_size", documentation="images per encoder batch",
                                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.encode_images = MicroBatcher(self.model.encode_images, max_batch=self.model.limits.max_batch,
                                          on_batch=self.batch_sizes.observe, name="image-encoder")
        self.cache_hits = bentoml.metrics.Counter(name="capt_label_cache_hits", documentation="label-set cache hits")
        self.cache_misses = bentoml.metrics.Counter(name="capt_label_cache_misses", documentation="label-set cache misses")
        self.probes = bentoml.metrics.Counter(name="capt_probes", documentation="probes run", labelnames=["flipped"])
        self.refusals = bentoml.metrics.Counter(name="capt_probe_refusals", documentation="probes refused",
                                                labelnames=["reason"])
        self.probe_seconds = bentoml.metrics.Histogram(name="capt_probe_seconds", documentation="probe time",
                                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        # The wire formats of other clients (serving/huggingface.py, serving/openai_api.py).
        self.served_model_name = os.environ.get("CAPT_SERVED_MODEL_NAME") or self.model.manifest["model"]
        self.embedding_slots = threading.BoundedSemaphore(self.model.limits.max_concurrent_embeddings)
        self.event_loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # BentoML builds us on it
        # /classify's work on threads (large uploads, label sets not cached) has threads of its own: on anyio's
        # default pool it would compete with BentoML's /livez, /readyz and /metrics.
        self.classify_threads = anyio.CapacityLimiter(CLASSIFY_THREADS)
        logger.warning(describe_api_keys(API_KEYS))  # on or off: a line an operator must see
        freeze_startup_heap()  # last: what start-up made is never garbage (serving/heap.py)

    def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: 503 unless a tiny classification through the served graphs (and the
        image batcher) answers, checked at most every CAPT_READY_CACHE_S seconds."""
        return self.model.ready(encode=self.encode_images)

    def _count_label_lookup(self, hit: bool) -> None:
        # From this request's own flag: the cache's shared counters move under concurrent requests too.
        (self.cache_hits if hit else self.cache_misses).inc()

    def _classify(self, images: list[Image], labels: list[str], templates: list[str] | None, top_k: int) -> dict:
        answer = self.model.classify_answer(images, labels, templates, top_k, encode=self.encode_images)
        self._count_label_lookup(answer["label_cache_hit"])
        return answer

    def _decode(self, uploads: list[Path]) -> list[Image]:
        """Uploads are taken as files, not as BentoML-decoded images, so that every one goes through
        our limits (bytes, pixels, decompression bombs) before it is decoded."""
        limits = self.model.limits
        return [read_upload(path, limits.max_upload_bytes, limits.max_image_pixels)
                for path in self._check_uploads(uploads)]

    def _check_uploads(self, uploads: list[Path]) -> list[Path]:
        if not uploads:
            raise RequestError("no image given")
        if len(uploads) > self.model.limits.max_images:
            raise RequestError(f"too many images: {len(uploads)} > {self.model.limits.max_images}")
        return uploads

    @bentoml.api
    async def classify(self, images: list[Path], labels: list[str], templates: list[str] | None = None,
                       top_k: int = 5) -> dict:
        """Multipart upload: one or more images and a label set -> labels ranked per image.

        ``ServingModel.classify_answer``'s steps, on the event loop: a thread hop per request cost more
        than the work of a small request (measured in README, Performance). What can take long runs on
        a thread: large uploads (``serving.images``), a label set not in the cache (its text encoding),
        and the image encoder (the micro-batcher's)."""
        try:
            model = self.model
            pixels = [await self._upload_pixels(path) for path in self._check_uploads(images)]
            labels, templates, top_k = model.check_classify_request(len(pixels), labels, templates, top_k)
            class_embeddings = model.label_cache.peek(model.label_cache_key(labels, templates))
            hit = class_embeddings is not None
            if not hit:
                class_embeddings, hit = await self._on_thread(model.cached_class_embeddings, labels, templates)
            embeddings = await self.encode_images.encode_async(np.concatenate(pixels))
            answer = model.classify_result(embeddings, labels, class_embeddings, hit, templates, top_k)
        except ClientError as err:
            return error_response(err)
        self._count_label_lookup(hit)
        return answer

    async def _upload_pixels(self, path: Path) -> np.ndarray:
        """One upload's model input ``[1, 3, H, W]``: small ones decoded on the loop, large ones on a thread."""
        limits = self.model.limits
        if not reads_inline(path):
            return await self._on_thread(
                lambda: self.model.pixels([read_upload(path, limits.max_upload_bytes, limits.max_image_pixels)]))
        image = open_upload(path, limits.max_upload_bytes, limits.max_image_pixels)
        if not decodes_inline(image, self.model.resized_pixels(image)):
            return await self._on_thread(lambda: self.model.pixels([load_upload(image)]))
        return self.model.pixels([load_upload(image)])

    async def _on_thread(self, function: Callable, *args):
        return await anyio.to_thread.run_sync(function, *args, limiter=self.classify_threads)

    @bentoml.api
    def classify_json(self, request: ClassifyJSON) -> dict:
        """The same with base64 images in a JSON body."""
        def work() -> dict:
            limits = self.model.limits
            if len(request.images) > limits.max_images:
                raise RequestError(f"too many images: {len(request.images)} > {limits.max_images}")
            images = [decode_base64_image(text, limits.max_upload_bytes, limits.max_image_pixels)
                      for text in request.images]
            return self._classify(images, request.labels, request.templates, request.top_k)
        return _answer(work)

    @bentoml.api
    def embed_image(self, images: list[Path]) -> dict:
        def work() -> dict:
            pixels = self.model.pixels(self._decode(images))
            return {"embeddings": self.encode_images(pixels).tolist()}
        return _answer(work)

    @bentoml.api
    def embed_text(self, labels: list[str], templates: list[str] | None = None) -> dict:
        """Class embeddings of a label set, with ``templates_applied`` as in classify."""
        def work() -> dict:
            checked_labels, checked_templates = validate_labels(labels, templates, self.model.limits)
            embeddings, hit = self.model.cached_class_embeddings(checked_labels, checked_templates)
            self._count_label_lookup(hit)
            return {"embeddings": embeddings.tolist(), "label_cache_hit": hit,
                    **self.model.templates_report(checked_templates)}
        return _answer(work)

    @bentoml.api
    def probe(self, image: Path, labels: list[str], true_label: str | None = None, eps: float = 4 / 255,
              steps: int = 10, step_size: float | None = None, restarts: int = 1, seed: int = 0,
              return_images: bool = False, search_eps: bool = False, attack: Literal["apgd", "pgd"] = DEFAULT_ATTACK,
              space: Literal["input", "upload"] = "input") -> dict:
        """An L∞ attack (APGD-CE by default, or PGD) against the served model's prompted PyTorch twin, in
        the model's input pixels or (``space="upload"``) the upload's own: clean and adversarial
        predictions, margins, and whether the prediction flipped, judged on the adversarial image
        rounded to 8 bits (an image a client can upload), by the twin and by the served ONNX graph."""
        def work() -> dict:
            try:
                result = self.model.probe(self._decode([image])[0], labels, true_label, eps, steps, step_size,
                                          restarts, seed, return_images, search_eps, attack=attack, space=space)
            except ClientError as err:
                if err.status != 400:
                    self.refusals.labels(reason=type(err).__name__).inc()
                raise
            self.probes.labels(flipped=str(result["flipped"]).lower()).inc()
            self.probe_seconds.observe(result["time_ms"] / 1000)
            return result
        return _answer(work)

    @bentoml.api(route="/info")
    def info(self) -> dict:
        return {**self.model.info(), "server": {"event_loop": self.event_loop, "http_parser": http_parser(),
                                                "listening_socket_per_worker": spreading_requested()}}


prepare_api_specs(Classifier)
Classifier.add_asgi_middleware(ApiKeyAuth, keys=API_KEYS)  # first: a request without a key gets no further
Classifier.add_asgi_middleware(BodySizeLimit, max_bytes=Limits.from_env().max_request_bytes)
Classifier.add_asgi_middleware(MultipartBoundaryRequired)
harden_multipart()
cancel_request_timers()
spread_connections()  # each API worker listens on a socket of its own beside the shared one (serving/sockets.py)
Classifier.mount_asgi_app(huggingface.create_app(bentoml.get_current_service), path=huggingface.MOUNT)
Classifier.mount_asgi_app(openai_api.create_app(bentoml.get_current_service), path=openai_api.MOUNT)
from .ui import ui_app  # noqa: E402 - the /ui page (serving/static/), served by this process
Classifier.mount_asgi_app(ui_app, path="/ui")
