"""What the service does, without BentoML: a verified bundle, label-set embeddings (cached), zero-shot
classification with ONNX Runtime, and the robustness probe (APGD or PGD, judged on 8-bit images) in PyTorch on
the same prompted model."""
from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from capt.attacks import PGD
from capt.data.templates import check_template
from capt.hardware import (autocast_factory, check_precision, detect, offered_precision, precision_reason,
                           resolve_precision, timed_precision)
from capt.images import pixel_transform, resized_size
from capt.prompts import ZeroShotClassifier
from export.bundle import IMAGE_ONNX, cuda_unavailable_reason, load_bundle, verify_bundle

from .adversarial import (UnsupportedPreprocessing, UploadTransform, apgd_ce, default_step_size, finite_nonnegative,
                          grid_room, linf_255, on_grid, quantise, to_image, to_tensor)
from .engine import (CHOICE_SOURCES, REFERENCE, TorchAutocastEngine, choice_key, reduced_copy, remembered,
                     remembered_engine, remembered_ort_threads)
from .errors import Busy, ImageRejected, ProbeTimeout, RequestError
from .images import png_base64

logger = logging.getLogger("capt.serving")


@dataclass(frozen=True)
class Limits:
    """Request limits; each can be set through the environment variable named in ``from_env``."""
    max_request_bytes: int = 64 * 1024 * 1024
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 32
    max_batch: int = 64  # images per image-encoder run, summed over concurrent requests (a request of more runs alone)
    max_labels: int = 1000
    max_label_chars: int = 200
    max_templates: int = 16
    max_top_k: int = 100
    max_probe_eps: float = 32 / 255
    max_probe_steps: int = 200
    max_probe_restarts: int = 5
    max_concurrent_probes: int = 2
    max_probe_seconds: float = 30.0
    # Space "upload" attacks every upload pixel through the resize: its cost and its answer's PNGs grow
    # with the upload, so it has a cap of its own (space "input" costs the same for any upload).
    max_probe_upload_pixels: int = 1024 * 1024
    # PyTorch threads for a probe; 0 = PyTorch's default. Probes run on the server's worker threads,
    # where OpenMP teams measured slower than on a main thread: on 2 cores, 1 thread made a 10-step
    # probe of the default model about 2x faster over HTTP. Large models on many cores want the default.
    probe_threads: int = 0
    # ONNX Runtime intra-op threads of the served graphs' CPU sessions; 0 = auto: one fewer than the
    # usable cores (the worker's event loop needs a core of its own), or all of them where the image
    # encoder measured at least 1.3x faster on them at start (``serving.engine.choose_ort_threads``).
    # With several workers on a machine, give each about cores / workers.
    ort_threads: int = 0
    # The probe's attack steps (forward+backward on the twin): auto, fp32, bf16 or fp16 autocast; auto
    # times one attack step in bf16 against fp32 at start on a CPU with native bf16 and takes bf16 at
    # capt.hardware.MIN_PRECISION_GAIN or better (capt.hardware.timed_precision), fp32 elsewhere. The
    # judgement of the attack's final image (``flipped``, margins, ``served_onnx``) is always fp32.
    probe_precision: str = "auto"
    label_cache_size: int = 256
    # /v1/embeddings requests at once; more are refused with 429 and Retry-After, never queued.
    max_concurrent_embeddings: int = 8
    # Seconds a readiness self-check (``ServingModel.ready``) is reused by /readyz before it runs again.
    ready_cache_s: float = 5.0

    @classmethod
    def from_env(cls) -> "Limits":
        """Each limit from ``CAPT_<NAME>`` (e.g. ``CAPT_MAX_PROBE_EPS``) where set."""
        values = {}
        for f in fields(cls):
            name = f"CAPT_{f.name.upper()}"
            raw = os.environ.get(name)
            if raw is None:
                continue
            kind = type(f.default)
            try:
                value = kind(raw.strip())
            except ValueError:
                value = None
            if kind is str:
                values[f.name] = value
            elif value is None or not math.isfinite(value) or value < 0:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{name} must be {what} >= 0 (default {f.default}), got {raw!r}")
            else:
                values[f.name] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class _Autocast(torch.nn.Module):
    """``classifier`` under autocast (a concrete precision; fp32: as it is), returning fp32 logits, so that
    an attack's steps take the fast path while its gradients and loss stay fp32 tensors."""

    def __init__(self, classifier: torch.nn.Module, precision: str):
        super().__init__()
        self.classifier, self.precision = classifier, precision

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32":
            return self.classifier(pixels)
        with autocast_factory(self.precision, pixels.device)():
            return self.classifier(pixels).float()


class _Deadline(torch.nn.Module):
    """Wraps the attacked classifier so that a probe stops at the next forward pass once its time
    is up: the attack code stays unaware of serving budgets."""

    def __init__(self, classifier: torch.nn.Module, seconds: float):
        super().__init__()
        self.classifier, self.seconds = classifier, seconds
        self.deadline = time.monotonic() + seconds

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if time.monotonic() > self.deadline:
            raise ProbeTimeout(f"probe stopped after the limit of {self.seconds:g} s; use fewer steps, restarts "
                               f"or no eps search")
        return self.classifier(pixels)


# The probe's attacks and spaces (see ``ServingModel.probe``). APGD is the default: it adapts its step
# size, so a client who sets only eps and steps gets a strong attack, and a probe that is weak for want
# of a tuned step would overstate robustness.
ATTACKS = ("apgd", "pgd")
DEFAULT_ATTACK = "apgd"
SPACES = ("input", "upload")
MAX_SEED = 2**32 - 1
EPS_SEARCH_GRID_255 = (1, 2, 4, 8, 16, 32)  # eps / (1/255); 8-bit images allow nothing smaller than 1/255
EPS_SEARCH_NOTE = ("eps at which this attack flipped the prediction (as an 8-bit image), refined by bisection; an "
                   "upper bound on the robust radius. A hold is only this attack failing, and the bisection assumes "
                   "that a flip found at one eps is found at every larger eps")
QUANTISATION_FAILED_NOTE = ("some pixels have no 8-bit value inside the eps ball around an off-grid clean pixel and kept "
                            "their clean value: this image is not one a client can upload")

# Said in an answer whose templates were given but not used (see ``ServingModel.templates_apply``).
TEMPLATES_IGNORED_NOTE = ("this model has learned text prompts: its learned context replaces a template's words, "
                          "so the templates given were not used")


# Readiness (``ServingModel.ready``): the labels of its tiny self-check classification, and one lock that
# lets one check run at a time.
READY_CHECK_LABELS = ("red", "blue")
_READY_LOCK = threading.Lock()


class LabelCache:
    """LRU of class embeddings keyed by (labels, templates), safe on the server's worker threads.

    Each key is computed once: the first caller of a missing key computes it, and callers of the same
    key arriving meanwhile wait for that result instead of paying for the same encode. A compute that
    raises (a label too long for the context, say) hands its error to every waiter and caches nothing,
    so a later call tries again.

    ``misses`` counts calls that ran a compute (failed ones too: the work was paid); ``hits`` counts
    calls answered without one, from the cache or from another caller's compute. A waiter whose compute
    failed is neither. Callers learn their own outcome from ``get_or_compute``'s flag: comparing the
    shared counters before and after a call is wrong as soon as two requests overlap."""

    def __init__(self, size: int):
        self.size, self.hits, self.misses = size, 0, 0
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._in_flight: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def peek(self, key: tuple) -> np.ndarray | None:
        """The cached value (a hit) or None, without waiting or computing (for an event loop, which
        must not block: on None, call ``get_or_compute`` on a thread)."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]

    def get_or_compute(self, key: tuple, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """(value, hit): ``hit`` is False for the call that ran ``compute``, True otherwise."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key], True
            pending = self._in_flight.get(key)
            computes = pending is None
            if computes:
                pending = self._in_flight[key] = Future()
                self.misses += 1
        if not computes:
            value = pending.result()  # raises the computing caller's error
            with self._lock:
                self.hits += 1
            return value, True
        try:
            value = compute()
        except BaseException as err:
            # Removed before the waiters are woken: a call from now on retries instead of getting this error.
            with self._lock:
                del self._in_flight[key]
            pending.set_exception(err)
            raise
        with self._lock:
            # Cached and no longer in flight in one step: a new caller finds one or the other.
            self._entries[key] = value
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            del self._in_flight[key]
        pending.set_result(value)
        return value, False


def validate_labels(labels: Sequence[str], templates: Sequence[str] | None, limits: Limits, minimum: int = 1) -> tuple[list[str], list[str] | None]:
    if not isinstance(labels, (list, tuple)) or not all(isinstance(l, str) for l in labels):
        raise RequestError("labels must be a list of strings")
    labels = [l.strip() for l in labels]
    if len(labels) < minimum:
        raise RequestError(f"need at least {minimum} label(s), got {len(labels)}")
    if len(labels) > limits.max_labels:
        raise RequestError(f"too many labels: {len(labels)} > {limits.max_labels}")
    if any(not l for l in labels):
        raise RequestError("labels must not be empty")
    if len(set(labels)) != len(labels):
        raise RequestError(f"duplicate labels: {sorted({l for l in labels if labels.count(l) > 1})}")
    if any(len(l) > limits.max_label_chars for l in labels):
        raise RequestError(f"a label is longer than {limits.max_label_chars} characters")
    if templates is not None:
        templates = list(templates)
        if not templates or len(templates) > limits.max_templates:
            raise RequestError(f"give 1..{limits.max_templates} templates")
        for template in templates:
            # Checked whether or not the bundle will use templates: a request is valid or not on its own.
            try:
                check_template(template)
            except ValueError as err:
                raise RequestError(str(err)) from None
    return labels, templates


class ServingModel:
    """A verified bundle, loaded for serving. ``classify`` takes an ``encode`` function (the service
    passes its cross-request batcher); by default the local ONNX session runs it."""

    def __init__(self, bundle_dir: str | Path, limits: Limits | None = None, providers: Sequence[str] | None = None,
                 check_twin: bool = True, engine: str | None = None):
        """``check_twin=False`` skips comparing the probe's twin with the graphs, for a process whose
        parent already did (``bentoml serve`` checks once before starting its workers)."""
        self.limits = limits or Limits()
        if self.limits.ort_threads < 0:
            raise ValueError(f"CAPT_ORT_THREADS must be >= 0 (0: auto), got {self.limits.ort_threads}")
        self.hardware = detect()
        self.ort_threads_report = {"used": self.limits.ort_threads, "reason": "CAPT_ORT_THREADS"}
        manifest = None
        if not self.limits.ort_threads:  # auto (serving/engine.py), timed on the verified graph
            manifest = verify_bundle(bundle_dir)
            self.ort_threads_report = remembered_ort_threads(Path(bundle_dir) / IMAGE_ONNX, manifest["files"][IMAGE_ONNX],
                                                             manifest["inputs"]["image"]["shape"][-1], self.hardware)
        self.ort_threads = self.ort_threads_report["used"]
        self.bundle = load_bundle(bundle_dir, providers, check=check_twin, ort_threads=self.ort_threads,
                                  verified_manifest=manifest)
        self.bundle_dir, self.manifest = self.bundle.path, self.bundle.manifest
        self.image_session, self.text_session = self.bundle.image_session, self.bundle.text_session
        self.provider = self.bundle.provider
        self.provider_note = None
        if self.provider != "CUDAExecutionProvider":
            reason = cuda_unavailable_reason() or "the CUDA provider failed to start"
            self.provider_note = f"running on {self.provider}: {reason}"
            logger.warning("ONNX Runtime %s", self.provider_note)
        self.torch_model = self.bundle.twin
        # The served image encoder (serving/engine.py): ``engine`` or CAPT_ENGINE, default auto (a short
        # self-test of the paths this machine offers, kept for later starts on this machine, which recheck
        # only its safety); an explicit one that cannot serve stops start-up.
        override = engine if engine is not None else os.environ.get("CAPT_ENGINE", "auto")
        self.engine, self.engine_report = remembered_engine(self.bundle, self.hardware, override, providers)
        logger.info("image encoder: %s (%s)", self.engine.name, self.engine_report["reason"])
        self.probe_precision, self.probe_precision_why, self.probe_model = self._probe_precision(
            check_precision(self.limits.probe_precision))
        self.transform = pixel_transform(self.torch_model.preprocess_cfg)
        self.logit_scale = self.bundle.logit_scale
        self.label_cache = LabelCache(self.limits.label_cache_size)
        self.probe_slots = threading.BoundedSemaphore(self.limits.max_concurrent_probes)
        self.probes_run = 0
        self.probe_seconds = 0.0

    def _probe_precision(self, requested: str) -> tuple[str, str, torch.nn.Module]:
        """(precision, why, model) of the probe's attack steps. The model is the twin for fp32, else a
        copy with its weights in that precision (the torch engine's own where it serves), so that autocast
        casts no weight at every step. ``auto`` where the machine offers a reduced precision is timed on
        one attack step (forward and backward to the pixels, batch 1, as a probe runs) each way."""
        self.probe_precision_report: dict = {}  # auto's timing, where it was timed (or recalled)
        precision = (offered_precision("cpu", self.hardware) if requested == "auto"
                     else resolve_precision(requested, "cpu", self.hardware))
        if precision == "fp32":
            why = f"CAPT_PROBE_PRECISION={requested}" if requested != "auto" else precision_reason("cpu", self.hardware)
            return precision, why, self.torch_model
        engine = self.engine

        @functools.cache
        def reduced() -> torch.nn.Module:  # made only where it is timed or used
            return (engine.model if isinstance(engine, TorchAutocastEngine) and engine.dtype == precision
                    and engine.device == "cpu" else reduced_copy(self.torch_model, precision, "cpu"))
        if requested != "auto":
            return precision, f"CAPT_PROBE_PRECISION={requested}", reduced()
        size = int(self.bundle.manifest["inputs"]["image"]["shape"][-1])
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

        def attack_step() -> None:
            model = reduced() if torch.is_autocast_enabled("cpu") else self.torch_model
            image = pixels.clone().requires_grad_(True)
            torch.autograd.grad(model.encode_image(image).float().sum(), image)

        def measure() -> dict:
            started = time.perf_counter()
            used, why = timed_precision(attack_step, "cpu", self.hardware, budget_s=3.0)
            return {"used": used, "reason": why, "seconds": round(time.perf_counter() - started, 3)}
        # Timed once per bundle, machine and thread count, and recalled by later starts (serving/engine.py).
        key = choice_key("probe-precision", self.hardware, sources=(*CHOICE_SOURCES, "serving/model.py"),
                         files=self.bundle.manifest["files"], offered=precision, torch_threads=torch.get_num_threads())
        self.probe_precision_report = remembered(key, measure, lambda kept: kept.get("used") in ("fp32", precision))
        precision, why = self.probe_precision_report["used"], self.probe_precision_report["reason"]
        return precision, why, reduced() if precision != "fp32" else self.torch_model

    # ---- encoders -----------------------------------------------------------------------------
    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        for image in images:
            self.check_resize(image)
        # np.stack, not torch.stack: the same array for half the time (on the event loop for small uploads).
        return np.stack([self.transform(image).numpy() for image in images])

    def resized_pixels(self, image: Image.Image) -> int:
        """Pixels of the image the model's preprocessing resizes ``image`` to before it crops: what
        turning it into pixels costs, whatever the upload's own size (``capt.images.resized_size``)."""
        width, height = resized_size(image.width, image.height, self.torch_model.preprocess_cfg)
        return width * height

    def check_resize(self, image: Image.Image) -> None:
        """A 400 for an image whose resize would be over ``max_image_pixels``: a few bytes of a very
        thin strip would otherwise become a resize of gigabytes. Needs only the header (``.size``)."""
        resized = self.resized_pixels(image)
        if resized == 0:
            raise ImageRejected(f"image of {image.width}x{image.height} is too thin for this model's input: its "
                                f"short side would be resized to 0 pixels")
        if resized > self.limits.max_image_pixels:
            long, short = max(image.size), max(min(image.size), 1)
            raise ImageRejected(
                f"image of {image.width}x{image.height} would be resized to {resized} pixels for this model's "
                f"input (aspect ratio {long / short:.0f}:1), over the limit of {self.limits.max_image_pixels} pixels")

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """The served image encoder (``self.engine``)."""
        return self.engine.encode(pixels.astype(np.float32))

    def encode_images_exported(self, pixels: np.ndarray) -> np.ndarray:
        """The exported ONNX graph as it is (fp32): the probe's served judgement."""
        return self.image_session.run(None, {"pixels": pixels.astype(np.float32)})[0]

    def encode_texts(self, texts_or_labels: Sequence[str], template: str | None = None) -> np.ndarray:
        tokens = self.torch_model.tokenize(list(texts_or_labels), template)
        return self.text_session.run(None, {"tokens": tokens.numpy()})[0]

    def check_labels_fit(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> None:
        """Labels whose text would be cut by the tokenizer's context are refused, not truncated:
        a truncated label silently becomes another label."""
        used_templates = list(templates) if self.templates_apply(templates) else [None]
        for template in used_templates:
            fits = self.torch_model.fits_context(labels, template)
            if not all(fits):
                too_long = next(label for label, ok in zip(labels, fits) if not ok)
                raise RequestError(f"label {too_long[:60]!r}{'...' if len(too_long) > 60 else ''} is longer than the "
                                   f"text context of {self.manifest['tokenizer']['context_length']} tokens")

    def templates_apply(self, templates: Sequence[str] | None) -> bool:
        """Whether a request's templates shape its class embeddings. Not on a bundle with learned text
        prompts: there the learned context is the template, and the given ones are accepted and ignored."""
        return bool(templates) and not self.torch_model.config.text_n_ctx

    def templates_report(self, templates: Sequence[str] | None) -> dict:
        """What an answer says about its templates: ``templates_applied`` is always a bool, True only when
        the request's templates were used (no templates given: False, the bundle's own prompt was used);
        templates given but ignored come with a ``templates_note`` saying why, so that a client does not
        take an answer for a template ensemble it was never given."""
        applied = self.templates_apply(templates)
        if templates and not applied:
            return {"templates_applied": False, "templates_note": TEMPLATES_IGNORED_NOTE}
        return {"templates_applied": applied}

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """[C, D] embeddings of a label set; templates are averaged CLIP-style (hand prompts only:
        with learned text prompts the learned context is the template)."""
        return self.cached_class_embeddings(labels, templates)[0]

    def cached_class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None
                                ) -> tuple[np.ndarray, bool]:
        """(``class_embeddings``, whether this call found them in the label cache)."""
        applied = self.templates_apply(templates)

        def compute() -> np.ndarray:
            self.check_labels_fit(labels, templates)
            if not applied:
                return self.encode_texts(labels)
            stacked = np.stack([self.encode_texts(labels, t) for t in templates]).mean(0)
            return stacked / np.linalg.norm(stacked, axis=-1, keepdims=True)
        return self.label_cache.get_or_compute(self.label_cache_key(labels, templates), compute)

    def label_cache_key(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> tuple:
        # Templates that are not applied are not part of the key: the embeddings are the label set's own.
        return tuple(labels), tuple(templates) if self.templates_apply(templates) else ()

    # ---- classification -----------------------------------------------------------------------
    def classify_embeddings(self, image_embeddings: np.ndarray, labels: list[str], class_embeddings: np.ndarray,
                            top_k: int) -> list[list[dict]]:
        logits = self.logit_scale * image_embeddings @ class_embeddings.T
        if self.manifest.get("logit_bias") is not None:
            logits = logits + self.manifest["logit_bias"]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        k = min(top_k, len(labels))
        ranked = np.argsort(-probs, axis=-1)[:, :k]
        return [[{"label": labels[i], "probability": float(p[i])} for i in row] for row, p in zip(ranked, probs)]

    def classify(self, images: Sequence[Image.Image], labels: Sequence[str], templates: Sequence[str] | None = None,
                 top_k: int = 5, encode: Callable[[np.ndarray], np.ndarray] | None = None) -> list[list[dict]]:
        """Per image, the ``top_k`` labels with their probabilities (``classify_answer``'s predictions)."""
        return self.classify_answer(images, labels, templates, top_k, encode)["predictions"]

    def classify_answer(self, images: Sequence[Image.Image], labels: Sequence[str],
                        templates: Sequence[str] | None = None, top_k: int | None = 5,
                        encode: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
        """The classify endpoints' answer: ``predictions``, ``label_cache_hit`` (this request's own
        lookup) and ``templates_applied`` (with ``templates_note`` when given templates were ignored).
        ``top_k=None`` ranks every label (the Hugging Face wire format answers them all). The service's
        multipart ``/classify`` makes the same checks and answer on its event loop (``serving.service``;
        it decodes its uploads first, as the other endpoints do before calling this)."""
        labels, templates, top_k = self.check_classify_request(len(images), labels, templates, top_k)
        # Labels first: one too long for the text context is refused before any image is encoded.
        class_embeddings, hit = self.cached_class_embeddings(labels, templates)
        embeddings = (encode or self.encode_images)(self.pixels(images))
        return self.classify_result(embeddings, labels, class_embeddings, hit, templates, top_k)

    def check_classify_request(self, n_images: int, labels: Sequence[str], templates: Sequence[str] | None,
                               top_k: int | None) -> tuple[list[str], list[str] | None, int]:
        """A classify request's labels, templates and ``top_k`` checked (400s), ``top_k=None`` resolved."""
        labels, templates = validate_labels(labels, templates, self.limits)
        if not n_images:
            raise RequestError("no image given")
        if n_images > self.limits.max_images:
            raise RequestError(f"too many images: {n_images} > {self.limits.max_images}")
        if top_k is None:
            top_k = len(labels)
        elif not 1 <= top_k <= self.limits.max_top_k:
            raise RequestError(f"top_k must be in 1..{self.limits.max_top_k}")
        return labels, templates, top_k

    def classify_result(self, image_embeddings: np.ndarray, labels: list[str], class_embeddings: np.ndarray,
                        hit: bool, templates: list[str] | None, top_k: int) -> dict:
        return {"predictions": self.classify_embeddings(np.asarray(image_embeddings), labels, class_embeddings, top_k),
                "label_cache_hit": hit, **self.templates_report(templates)}

    # ---- probe --------------------------------------------------------------------------------
    def _check_probe_args(self, labels, true_label, eps, steps, step_size, restarts, seed=0, attack=DEFAULT_ATTACK,
                          space="input", image=None):
        labels, _ = validate_labels(labels, None, self.limits, minimum=2)
        if not finite_nonnegative(eps):
            raise RequestError(f"eps must be a finite number >= 0, got {eps}")
        if step_size is not None and not finite_nonnegative(step_size):
            raise RequestError(f"step_size must be a finite number >= 0, got {step_size}")
        if eps > self.limits.max_probe_eps:
            raise RequestError(f"eps {eps:.5f} is over the limit of {self.limits.max_probe_eps:.5f}")
        if not 0 <= steps <= self.limits.max_probe_steps:
            raise RequestError(f"steps must be in 0..{self.limits.max_probe_steps}")
        if not 1 <= restarts <= self.limits.max_probe_restarts:
            raise RequestError(f"restarts must be in 1..{self.limits.max_probe_restarts}")
        # Checked here, not left to torch: a seed past 64 bits is an OverflowError (a 500) in manual_seed.
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
        if attack not in ATTACKS:
            raise RequestError(f"attack must be one of {', '.join(map(repr, ATTACKS))}, got {attack!r}")
        if attack == "apgd" and step_size is not None:
            # Refused rather than ignored: a client that sets a step expects it to be the attack's step.
            raise RequestError("step_size is for attack 'pgd' only: APGD adapts its own step size")
        if space not in SPACES:
            raise RequestError(f"space must be one of {', '.join(map(repr, SPACES))}, got {space!r}")
        if space == "upload":
            self._upload_transform()  # refuses a model whose preprocessing has no differentiable copy
            if image is not None and image.width * image.height > self.limits.max_probe_upload_pixels:
                raise RequestError(f"space 'upload' attacks every upload pixel: {image.width}x{image.height} is over "
                                   f"the limit of {self.limits.max_probe_upload_pixels} pixels "
                                   f"(CAPT_MAX_PROBE_UPLOAD_PIXELS); use space 'input' or a smaller image")
        if true_label is not None and true_label not in labels:
            raise RequestError(f"true_label {true_label!r} is not one of the labels")
        return labels

    def _upload_transform(self) -> UploadTransform:
        """The differentiable copy of this model's preprocessing, built on first use of space 'upload'."""
        transform = getattr(self, "_upload_transform_module", None)
        if transform is None:
            try:
                transform = UploadTransform(self.torch_model.preprocess_cfg)
            except UnsupportedPreprocessing as err:
                raise RequestError(f"space 'upload' is not supported for this model: {err}") from None
            self._upload_transform_module = transform
        return transform

    def probe(self, image: Image.Image, labels: Sequence[str], true_label: str | None = None, eps: float = 4 / 255,
              steps: int = 10, step_size: float | None = None, restarts: int = 1, seed: int = 0,
              return_images: bool = False, search_eps: bool = False, attack: str = DEFAULT_ATTACK,
              space: str = "input") -> dict:
        """How robust the model's prediction on ``image`` is, by attacking the served model's PyTorch twin.

        Threat model: untargeted, white-box (gradients of the twin), L∞ ball of radius ``eps`` in pixel
        units of [0, 1]; ``space="input"`` perturbs the model's input pixels (the image after
        preprocessing resized and cropped it), ``space="upload"`` the upload's own pixels, through a
        differentiable copy of that preprocessing. An adversarial image counts only as an 8-bit image
        in the ball (what a client can send): the attack's image is quantised to k/255 before the twin
        and the served ONNX graph judge it, in space "upload" through the real preprocessing, and
        ``flipped`` is that judgment. ``attack``: "apgd" (APGD-CE, the default: no step size to tune) or
        "pgd" (step ``step_size``, by default ``max(eps/4, 2.5·eps/steps)``). Restart 0 starts at the
        clean image, later ones at seeded random points in the ball; the restart with the lowest margin
        after quantisation wins. A prediction that holds is no proof of robustness: only this attack
        failed."""
        labels = self._check_probe_args(labels, true_label, eps, steps, step_size, restarts, seed, attack, space, image)
        seed = int(seed)  # a numpy integer too: seed + restart must not wrap around
        if not self.probe_slots.acquire(blocking=False):
            raise Busy(f"{self.limits.max_concurrent_probes} probes are already running; retry later")
        started = time.perf_counter()
        if self.limits.probe_threads:
            torch.set_num_threads(self.limits.probe_threads)  # OpenMP's setting is per calling thread
        try:
            with torch.no_grad():  # the attacks turn gradients on where they need them
                result = self._probe(image, labels, true_label, eps, steps, step_size, restarts, seed, return_images,
                                     search_eps, attack, space)
        finally:
            self.probe_slots.release()
        elapsed = time.perf_counter() - started
        self.probes_run += 1
        self.probe_seconds += elapsed
        result["time_ms"] = round(1000 * elapsed, 1)
        return result

    def _attack_classifier(self, classifier: "_Deadline") -> "_Deadline":
        """``classifier`` (the fp32 twin's, which judges) on the probe's model, with the same deadline."""
        if self.probe_model is self.torch_model:
            return classifier
        reduced = _Deadline(ZeroShotClassifier(self.probe_model, classifier.classifier.class_embeddings), classifier.seconds)
        reduced.deadline = classifier.deadline
        return reduced

    def _attack(self, view, classifier, target, eps, steps, step_size, restarts, seed, attack) -> "_Outcome":
        """Untargeted ``attack`` (CE on ``target``) in ``view``'s space with restarts. Each restart's image
        is quantised to the 8-bit grid inside the ball and judged by the twin on what the real pipeline
        makes of it; the restart with the lowest such margin wins, and a flip ends the search."""
        attacked = view.attacked(_Autocast(self._attack_classifier(classifier), self.probe_precision))  # the judge stays fp32
        best = None
        for restart in range(restarts):
            # Restart 0 from the clean image: with few steps the signed gradient there leads straight to
            # the ball's edge. Later ones from seeded random points, each restart its own seed.
            random_start = restart > 0
            if attack == "pgd":
                adversarial = PGD(attacked, eps=eps, alpha=step_size if step_size is not None else default_step_size(eps, steps),
                                  steps=steps, random_start=random_start, loss="ce", seed=seed + restart)(view.clean, target)
            else:
                adversarial = apgd_ce(attacked, view.clean, target, eps, steps, random_start=random_start,
                                      generator=torch.Generator().manual_seed(seed + restart))
            quantised = quantise(adversarial, view.clean, eps)
            served = view.served_pixels(quantised)
            float_logits, logits = view.judge(classifier, adversarial, served)
            outcome = _Outcome(adversarial, quantised, served, logits, _margin(logits, int(target[0])),
                               float_logits, _margin(float_logits, int(target[0])), restart)
            if best is None or outcome.margin < best.margin:
                best = outcome
            if outcome.margin < 0:
                break
        return best

    def _view(self, image, pixels, space) -> "_InputView | _UploadView":
        if space == "upload":
            return _UploadView(self, image, self._upload_transform(), pixels)
        return _InputView(pixels, image)

    def _probe(self, image, labels, true_label, eps, steps, step_size, restarts, seed, return_images, search_eps,
               attack, space):
        model = self.torch_model
        class_embeddings = torch.from_numpy(self.class_embeddings(labels)).float()
        classifier = _Deadline(ZeroShotClassifier(model, class_embeddings), self.limits.max_probe_seconds)
        pixels = torch.from_numpy(self.pixels([image]))
        view = self._view(image, pixels, space)
        # One forward+backward gives the clean prediction and the gradient sanity check (in space
        # "upload" the gradient goes through the resize copy; the clean prediction is the real pipeline's).
        with torch.enable_grad():
            probe_input = view.clean.clone().requires_grad_(True)
            logits = view.attacked(classifier)(probe_input)
            clean_logits = logits[0].detach() if space == "input" else classifier(pixels)[0].detach()
            clean_index = int(clean_logits.argmax())
            target_index = labels.index(true_label) if true_label is not None else clean_index
            target = torch.tensor([target_index])
            gradient, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target), probe_input)
        outcome = self._attack(view, classifier, target, eps, steps, step_size, restarts, seed, attack)
        onnx_embeddings = self.encode_images_exported(torch.cat([pixels, outcome.served]).numpy())
        onnx_answers = self.classify_embeddings(onnx_embeddings, labels, class_embeddings.numpy(), 1)
        used_step = (step_size if step_size is not None else default_step_size(eps, steps)) if attack == "pgd" else None
        quantised = on_grid(outcome.quantised)
        result = {
            "labels": labels,
            "target": labels[target_index],
            "eps": eps, "eps_255": round(eps * 255, 3), "steps": steps, "step_size": used_step, "restarts": restarts,
            "attack": {**_attack_report(attack, eps, steps, used_step, restarts, seed),
                       "precision": self.probe_precision},
            **view.describe(),
            "clean": _prediction(clean_logits, labels),
            "adversarial": _prediction(outcome.logits, labels),
            "flipped": int(outcome.logits.argmax()) != target_index,
            "margin_clean": _margin(clean_logits, target_index),
            "margin_adversarial": outcome.margin,
            "adversarial_quantised": quantised,
            "quantisation_note": view.quantisation_note() if quantised else QUANTISATION_FAILED_NOTE,
            "float": {"adversarial": _prediction(outcome.float_logits, labels),
                      "flipped": int(outcome.float_logits.argmax()) != target_index,
                      "margin": outcome.float_margin,
                      "linf_distance": float((outcome.adversarial - view.clean).abs().max())},
            "served_onnx": {"clean": onnx_answers[0][0], "adversarial": onnx_answers[1][0],
                            "flipped": onnx_answers[1][0]["label"] != labels[target_index]},
            "linf_distance": float((outcome.quantised - view.clean).abs().max()),
            "linf_distance_255": linf_255(outcome.quantised, view.clean),
            "sanity": {
                "zero_gradient": bool(gradient.abs().max() == 0),
                "clean_already_wrong": clean_index != target_index,
                # Also when eps admits no 8-bit change: on the grid, any eps under 1/255.
                "attack_did_nothing": eps == 0 or steps == 0 or grid_room(view.clean, eps) <= 0,
            },
        }
        if self.engine.name != REFERENCE:
            # What classify answers on these images when another path than the exported graph serves it.
            served = self.classify_embeddings(self.encode_images(torch.cat([pixels, outcome.served]).numpy()), labels,
                                              class_embeddings.numpy(), 1)
            result["served_engine"] = {"engine": self.engine.name, "clean": served[0][0], "adversarial": served[1][0],
                                       "flipped": served[1][0]["label"] != labels[target_index]}
        if space == "upload":
            result["linf_distance_input_255"] = linf_255(outcome.served, pixels)
        if return_images:
            delta = (outcome.quantised - view.clean)[0]
            amplified = (0.5 + 0.5 * delta / max(eps, 1e-12)).clamp(0, 1)
            result["adversarial_png"] = png_base64(to_image(outcome.quantised))
            result["perturbation_png"] = png_base64(to_image(amplified))
        if search_eps:
            result["eps_search"] = self._search_eps(view, classifier, target, steps, restarts, seed, attack,
                                                    clean_index != target_index)
        return result

    def _search_eps(self, view, classifier, target, steps, restarts, seed, attack, clean_wrong) -> dict:
        """The smallest eps at which the attack flips the prediction, as an 8-bit image: the grid 1, 2, 4,
        8, 16, 32 /255 (within the eps limit) up to the first flip, then bisection between the last
        holding and the first flipping eps. Each eps is attacked afresh with the request's attack,
        steps (at least 1) and restarts, PGD's step by the default rule at that eps.

        The bisection stops at 1/255 when the clean image is on the 8-bit grid (always, for the served
        pipeline): an eps between two steps admits the same 8-bit images as the step below it, so that
        is the exact resolution of this threat model; 0.25/255 otherwise."""
        steps = max(steps, 1)
        ticks = 1 if on_grid(view.clean) else 4  # bisection ticks per 1/255
        grid = [k for k in EPS_SEARCH_GRID_255 if k / 255 <= self.limits.max_probe_eps + 1e-12]
        report = {"grid_255": grid, "resolution_255": 1 / ticks, "space": view.name,
                  "attack": _attack_report(attack, None, steps, "max(eps/4, 2.5*eps/steps) at each eps" if attack == "pgd"
                                           else None, restarts, seed),
                  "note": EPS_SEARCH_NOTE}
        if clean_wrong:
            return {**report, "smallest_flipping_eps": 0.0, "smallest_flipping_eps_255": 0.0, "largest_holding_eps": None,
                    "largest_holding_eps_255": None, "grid": [], "bisection": [],
                    "note": "the clean image is already not classified as the target: it flips at eps 0"}

        def trial(tick: int) -> dict:
            eps = tick / ticks / 255
            outcome = self._attack(view, classifier, target, eps, steps, None, restarts, seed, attack)
            return {"eps": eps, "eps_255": round(tick / ticks, 3), "flipped": outcome.margin < 0,
                    "margin": outcome.margin, "float_flipped": outcome.float_margin < 0,
                    "linf_distance_255": linf_255(outcome.quantised, view.clean)}

        holding, flipping, tried, refined = 0, None, [], []  # in ticks; eps 0 holds: the clean image is right
        for k in grid:
            entry = trial(k * ticks)
            tried.append(entry)
            if entry["flipped"]:
                flipping = k * ticks
                break
            holding = k * ticks
        if flipping is not None:
            while flipping - holding > 1:
                middle = (holding + flipping) // 2
                entry = trial(middle)
                refined.append(entry)
                if entry["flipped"]:
                    flipping = middle
                else:
                    holding = middle
        found = {"smallest_flipping_eps": None if flipping is None else flipping / ticks / 255,
                 "smallest_flipping_eps_255": None if flipping is None else round(flipping / ticks, 3),
                 "largest_holding_eps": holding / ticks / 255, "largest_holding_eps_255": round(holding / ticks, 3)}
        return {**report, **found, "grid": tried, "bisection": refined}

    # ---- wire formats and readiness ---------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """Size of the image and text embeddings (the graphs' static output width)."""
        return int(self.text_session.get_outputs()[0].shape[-1])

    def count_tokens(self, labels: Sequence[str]) -> list[int]:
        """Per label, the token ids the text encoder runs on (start and end tokens and the template's
        words included, padding and learned prompt vectors not): what an embeddings answer's ``usage``
        reports."""
        return [int(n) for n in (self.torch_model.tokenize(list(labels)) != 0).sum(-1)]

    def self_check(self, encode: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """A tiny classification end to end: two labels through the text graph (not the label cache)
        and a generated 64x64 image through preprocessing and ``encode`` (the service's batcher; by
        default the served image encoder). Raises when the model cannot answer: an error from a session, or
        embeddings of the wrong shape or not finite."""
        ramp = np.linspace(0, 255, 64, dtype=np.float32)
        image = Image.fromarray(np.stack([ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1),
                                          np.full((64, 64), 128, np.float32)], -1).astype(np.uint8))
        texts = np.asarray(self.encode_texts(READY_CHECK_LABELS))
        images = np.asarray((encode or self.encode_images)(self.pixels([image])))
        dim = self.embedding_dim
        if texts.shape != (len(READY_CHECK_LABELS), dim) or images.shape != (1, dim):
            raise RuntimeError(f"embeddings of shape {texts.shape} and {images.shape}, expected (2, {dim}) and (1, {dim})")
        if not (np.isfinite(texts).all() and np.isfinite(images).all()):
            raise RuntimeError("embeddings are not finite")
        probabilities = [p["probability"] for p in self.classify_embeddings(images, list(READY_CHECK_LABELS), texts, 2)[0]]
        if not np.isfinite(probabilities).all() or abs(sum(probabilities) - 1) > 1e-3:
            raise RuntimeError(f"probabilities {probabilities} do not sum to 1")

    def ready(self, encode: Callable[[np.ndarray], np.ndarray] | None = None) -> bool:
        """Whether ``self_check`` passes, reusing its outcome for ``limits.ready_cache_s`` seconds (one
        check at a time: concurrent callers wait for it). A change of state is logged, with the reason."""
        with _READY_LOCK:
            checked_at, was_ready = self.__dict__.get("_ready_state", (None, None))
            if checked_at is not None and time.monotonic() - checked_at < self.limits.ready_cache_s:
                return was_ready
            try:
                self.self_check(encode)
                ready, reason = True, None
            except Exception as err:  # any failure means "cannot answer", which is what /readyz reports
                ready, reason = False, f"{type(err).__name__}: {err}"
            self._ready_state = (time.monotonic(), ready)
        if not ready and was_ready is not False:
            logger.error("not ready: the self-check classification failed (%s)", reason)
        elif ready and was_ready is False:
            logger.warning("ready again: the self-check classification passed")
        return ready

    def info(self) -> dict:
        m = self.manifest
        return {"model": m["model"], "method": m.get("method"), "pretrained": m.get("pretrained"),
                "quick_gelu": m["quick_gelu"], "prompt": m["prompt"], "image_size": m["inputs"]["image"]["shape"][-1],
                "tokenizer": m["tokenizer"],  # how to reproduce the text encoder's token ids
                "parity": {k: m["parity"][k] for k in ("max_abs_diff", "top1_agreement")},
                "onnx_provider": self.provider, "onnx_provider_note": self.provider_note, "limits": self.limits.to_dict(),
                "label_cache": {"hits": self.label_cache.hits, "misses": self.label_cache.misses},
                "probes_run": self.probes_run, "torch_threads": torch.get_num_threads(),
                "ort_threads": {"requested": self.limits.ort_threads, **self.ort_threads_report,
                                "note": "intra-op threads of each ONNX Runtime CPU session; requested 0 = auto: "
                                        "one core left to the event loop unless the encoder needs them all"},
                "image_engine": {**self.engine_report, "serving": self.engine.name},
                "probe_precision": {"requested": self.limits.probe_precision, "used": self.probe_precision,
                                    "why": self.probe_precision_why,
                                    **{k: v for k, v in self.probe_precision_report.items() if k in ("seconds", "recalled", "cpu_contention", "kept", "not_kept")},
                                    "note": "autocast of the attack steps; the final image is judged in fp32"},
                "hardware": self.hardware.to_dict()}


def _prediction(logits: torch.Tensor, labels: list[str]) -> dict:
    probs = torch.softmax(logits.float(), -1)
    index = int(probs.argmax())
    return {"label": labels[index], "probability": float(probs[index])}


def _margin(logits: torch.Tensor, target: int) -> float:
    others = torch.cat([logits[:target], logits[target + 1:]])
    return float(logits[target] - others.max())


def _attack_report(attack: str, eps: float | None, steps: int, step_size, restarts: int, seed: int) -> dict:
    """What ran, so that an answer can be reproduced and judged: name, steps, step size, restarts, starts."""
    report = {"name": attack, "loss": "ce", "steps": steps, "restarts": restarts, "seed": seed,
              "starts": "restart 0 at the clean image, later ones at random points in the ball (seed + restart)"}
    if attack == "pgd":
        return {**report, "step_size": step_size}
    if eps is not None:
        report["initial_step_size"] = 2 * eps
    return {**report, "step_size": "adaptive",
            "step_size_rule": "2*eps, halved at checkpoints where the loss stopped rising (APGD)"}


@dataclass
class _Outcome:
    """One attack's result: its float image, that image quantised (both in the attacked space), the
    model input the real pipeline makes of the quantised one, and the twin's logits and margins."""
    adversarial: torch.Tensor
    quantised: torch.Tensor
    served: torch.Tensor
    logits: torch.Tensor
    margin: float
    float_logits: torch.Tensor
    float_margin: float
    restart: int


def _size(tensor: torch.Tensor) -> list[int]:
    return [int(tensor.shape[-1]), int(tensor.shape[-2])]  # width, height, as images are named


class _InputView:
    """Space "input": the model's input pixels are attacked; an 8-bit image at the input size is what
    preprocessing leaves as it is, so the quantised image is the served input itself."""
    name = "input"

    def __init__(self, pixels: torch.Tensor, image: Image.Image):
        self.clean, self.upload_size = pixels, list(image.size)
        w, h = _size(pixels)
        if self.upload_size == [w, h]:
            self.eps_space = f"model input ({w}x{h}; the upload itself, which preprocessing leaves as it is)"
        else:
            self.eps_space = (f"model input ({w}x{h} after preprocessing resized and cropped the "
                              f"{image.width}x{image.height} upload); the adversarial image is {w}x{h}, a size "
                              f"preprocessing leaves as it is")

    def attacked(self, classifier: torch.nn.Module) -> torch.nn.Module:
        return classifier

    def served_pixels(self, quantised: torch.Tensor) -> torch.Tensor:
        return quantised

    def judge(self, classifier, adversarial, served) -> tuple[torch.Tensor, torch.Tensor]:
        both = classifier(torch.cat([adversarial, served]))  # one forward for the float and the 8-bit image
        return both[0], both[1]

    def describe(self) -> dict:
        return {"space": "input", "eps_space": self.eps_space, "upload_size": self.upload_size,
                "input_size": _size(self.clean), "upload_preprocessed": self.upload_size != _size(self.clean)}

    def quantisation_note(self) -> str:
        return ("the adversarial image was rounded to 8 bits (k/255) in the model's input pixels, towards the clean "
                "pixel where rounding would leave the eps ball, before the twin and the served ONNX graph judged it: "
                "`flipped` and `served_onnx` are about an image a client can upload; `float` is the attack's unrounded "
                "image. The clean input is on this grid, so an eps under 1/255 allows no change at all.")


class _UploadView:
    """Space "upload": the upload's own pixels are attacked through ``UploadTransform``; the quantised
    upload is judged through the real pipeline (8-bit RGB image -> ``ServingModel.pixels``), as a real
    upload of it would be."""
    name = "upload"

    def __init__(self, serving: "ServingModel", image: Image.Image, transform: torch.nn.Module, pixels: torch.Tensor):
        self.serving, self.transform, self.pixels = serving, transform, pixels
        self.clean = to_tensor(image)

    def attacked(self, classifier: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.Sequential(self.transform, classifier)

    def served_pixels(self, quantised: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.serving.pixels([to_image(quantised)]))

    def judge(self, classifier, adversarial, served) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attacked(classifier)(adversarial)[0], classifier(served)[0]

    def describe(self) -> dict:
        (w, h), (iw, ih) = _size(self.clean), _size(self.pixels)
        return {"space": "upload",
                "eps_space": (f"upload pixels ({w}x{h}), attacked through a differentiable copy of the preprocessing "
                              f"to {iw}x{ih} and judged through the real one"),
                "upload_size": [w, h], "input_size": [iw, ih], "upload_preprocessed": [w, h] != [iw, ih],
                # How far the differentiable copy is from the real preprocessing on this upload (clean).
                "surrogate_gap_255": linf_255(self.transform(self.clean), self.pixels)}

    def quantisation_note(self) -> str:
        return ("the adversarial upload was rounded to 8 bits (k/255), towards the clean pixel where rounding would "
                "leave the eps ball, and then preprocessed by the real pipeline before the twin and the served ONNX "
                "graph judged it: `flipped` and `served_onnx` are about an image a client can upload; `float` is the "
                "attack's unrounded upload through the differentiable copy. The upload is on this grid, so an eps "
                "under 1/255 allows no change at all.")
