"""The framework's ceiling for ``/classify``: a BentoML service with the same ``/classify`` signature
as ``serving.service:Classifier`` that decodes the upload and answers a constant. What
``benchmarks/ceiling.py`` compares the real service with: the requests/s that BentoML, the decoder
and the middlewares allow on this machine before any model work.

The same as the real service:
- the BentoML service options: ``threads=16``, ``traffic={"timeout": 120, "max_concurrency": 64}``
  (read from ``Classifier``'s own config, so they cannot drift apart);
- the endpoint: an async ``@bentoml.api`` ``classify(images: list[Path], labels: list[str],
  templates: list[str] | None = None, top_k: int = 5)``, with unknown fields refused
  (``extra="forbid"``, ``prepare_api_specs``), so BentoML parses and validates the same multipart form and spools each
  upload to a temporary file (an async endpoint, as ``Classifier.classify`` is: a sync one, run on
  BentoML's thread pool, measured 0.63-0.79x as fast here);
- the decoding: ``serving.images``' upload functions with the same limits (``serving.model.Limits.from_env``),
  the same count checks as ``Classifier._check_uploads``, and the same choice of what the event loop
  decodes itself and what goes to a thread;
- the ASGI middlewares (``ApiKeyAuth``, ``BodySizeLimit``, ``MultipartBoundaryRequired``),
  ``harden_multipart``, ``cancel_request_timers`` and ``redact_request_errors``;
- the heap frozen at the end of start-up (``serving.heap.freeze_startup_heap``).

Not the same: no model (no label validation or label-cache lookup, no pixel transform, no micro-
batcher, no ONNX Runtime run, no ranking), no Prometheus counters of our own, no ``__is_ready__``
self-check, no ``on_deployment`` bundle check, and none of the mounted apps (``/hf``, ``/v1``,
``/ui``; Starlette tries them only after the API routes, so they should not cost ``/classify``
anything). The answer is a small constant dict, not a ranking of 64 labels.

    bentoml serve benchmarks.ceiling_service:Ceiling
"""
from __future__ import annotations

from pathlib import Path

import bentoml
from starlette.concurrency import run_in_threadpool

from serving.auth import ApiKeyAuth, load_api_keys
from serving.errors import ClientError, RequestError
from serving.huggingface import error_response
from serving.images import decodes_inline, load_upload, open_upload, read_upload, reads_inline
from serving.heap import freeze_startup_heap
from serving.middleware import BodySizeLimit, MultipartBoundaryRequired, cancel_request_timers, harden_multipart, \
    prepare_api_specs, redact_request_errors
from serving.model import Limits
from serving.service import Classifier
from serving.sockets import spread_connections

NAME = "ceiling"  # the service's name: BENTOML_CONFIG_OPTIONS="services.ceiling.workers=2" sets its workers
ANSWER = {"predictions": [[{"label": "constant", "score": 1.0}]], "label_cache_hit": True}
_options = {key: Classifier.config[key] for key in ("traffic", "threads") if key in Classifier.config}


@bentoml.service(name=NAME, **_options)
class Ceiling:
    def __init__(self) -> None:
        redact_request_errors()
        self.limits = Limits.from_env()
        freeze_startup_heap()

    @bentoml.api
    async def classify(self, images: list[Path], labels: list[str], templates: list[str] | None = None,
                       top_k: int = 5) -> dict:
        """Decodes every upload as ``Classifier.classify`` does, then answers a constant."""
        try:
            limits = self.limits
            if not images:
                raise RequestError("no image given")
            if len(images) > limits.max_images:
                raise RequestError(f"too many images: {len(images)} > {limits.max_images}")
            for path in images:
                if not reads_inline(path):
                    await run_in_threadpool(read_upload, path, limits.max_upload_bytes, limits.max_image_pixels)
                    continue
                image = open_upload(path, limits.max_upload_bytes, limits.max_image_pixels)
                if decodes_inline(image, resized_pixels=0):  # no model, so no resize: the upload's own size counts
                    load_upload(image)
                else:
                    await run_in_threadpool(load_upload, image)
        except ClientError as err:
            return error_response(err)
        return ANSWER


prepare_api_specs(Ceiling)
Ceiling.add_asgi_middleware(ApiKeyAuth, keys=load_api_keys())
Ceiling.add_asgi_middleware(BodySizeLimit, max_bytes=Limits.from_env().max_request_bytes)
Ceiling.add_asgi_middleware(MultipartBoundaryRequired)
harden_multipart()
cancel_request_timers()
spread_connections()  # each API worker listens on a socket of its own beside the shared one (serving/sockets.py)
