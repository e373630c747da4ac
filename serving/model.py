"""What the service does, without BentoML: a verified bundle, label-set embeddings (cached), zero-shot
classification with ONNX Runtime, and the PGD probe in PyTorch on the same prompted model."""
from __future__ import annotations

import logging
import math
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
from capt.images import pixel_transform
from capt.prompts import ZeroShotClassifier
from export.bundle import cuda_unavailable_reason, load_bundle

from .errors import Busy, ProbeTimeout, RequestError
from .images import png_base64

logger = logging.getLogger("capt.serving")


@dataclass(frozen=True)
class Limits:
    """Request limits; each can be set through the environment variable named in ``from_env``."""
    max_request_bytes: int = 64 * 1024 * 1024
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 32
    max_batch: int = 64  # images per image-encoder run, summed over concurrent requests
    max_labels: int = 1000
    max_label_chars: int = 200
    max_templates: int = 16
    max_top_k: int = 100
    max_probe_eps: float = 32 / 255
    max_probe_steps: int = 200
    max_probe_restarts: int = 5
    max_concurrent_probes: int = 2
    max_probe_seconds: float = 30.0
    # PyTorch threads for a probe; 0 = PyTorch's default. Probes run on the server's worker threads,
    # where OpenMP teams measured slower than on a main thread: on 2 cores, 1 thread made a 10-step
    # probe of the default model about 2x faster over HTTP. Large models on many cores want the default.
    probe_threads: int = 0
    label_cache_size: int = 256

    @classmethod
    def from_env(cls) -> "Limits":
        """Each limit from ``CAPT_<NAME>`` (e.g. ``CAPT_MAX_PROBE_EPS``) where set."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"CAPT_{f.name.upper()}")
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


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


# Said in an answer whose templates were given but not used (see ``ServingModel.templates_apply``).
TEMPLATES_IGNORED_NOTE = ("this model has learned text prompts: its learned context replaces a template's words, "
                          "so the templates given were not used")


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
                 check_twin: bool = True):
        """``check_twin=False`` skips comparing the probe's twin with the graphs, for a process whose
        parent already did (``bentoml serve`` checks once before starting its workers)."""
        self.bundle = load_bundle(bundle_dir, providers, check=check_twin)
        self.bundle_dir, self.manifest = self.bundle.path, self.bundle.manifest
        self.limits = limits or Limits()
        self.image_session, self.text_session = self.bundle.image_session, self.bundle.text_session
        self.provider = self.bundle.provider
        self.provider_note = None
        if self.provider != "CUDAExecutionProvider":
            reason = cuda_unavailable_reason() or "the CUDA provider failed to start"
            self.provider_note = f"running on {self.provider}: {reason}"
            logger.warning("ONNX Runtime %s", self.provider_note)
        self.torch_model = self.bundle.twin
        self.transform = pixel_transform(self.torch_model.preprocess_cfg)
        self.logit_scale = self.bundle.logit_scale
        self.label_cache = LabelCache(self.limits.label_cache_size)
        self.probe_slots = threading.BoundedSemaphore(self.limits.max_concurrent_probes)
        self.probes_run = 0
        self.probe_seconds = 0.0

    # ---- encoders -----------------------------------------------------------------------------
    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        return torch.stack([self.transform(image) for image in images]).numpy()

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
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
        # Templates that are not applied are not part of the key: the embeddings are the label set's own.
        key = (tuple(labels), tuple(templates) if applied else ())
        return self.label_cache.get_or_compute(key, compute)

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
                        templates: Sequence[str] | None = None, top_k: int = 5,
                        encode: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
        """The classify endpoints' answer: ``predictions``, ``label_cache_hit`` (this request's own
        lookup) and ``templates_applied`` (with ``templates_note`` when given templates were ignored)."""
        labels, templates = validate_labels(labels, templates, self.limits)
        if not images:
            raise RequestError("no image given")
        if len(images) > self.limits.max_images:
            raise RequestError(f"too many images: {len(images)} > {self.limits.max_images}")
        if not 1 <= top_k <= self.limits.max_top_k:
            raise RequestError(f"top_k must be in 1..{self.limits.max_top_k}")
        # Labels first: one too long for the text context is refused before any image is encoded.
        class_embeddings, hit = self.cached_class_embeddings(labels, templates)
        embeddings = (encode or self.encode_images)(self.pixels(images))
        return {"predictions": self.classify_embeddings(np.asarray(embeddings), labels, class_embeddings, top_k),
                "label_cache_hit": hit, **self.templates_report(templates)}

    # ---- probe --------------------------------------------------------------------------------
    def _check_probe_args(self, labels, true_label, eps, steps, step_size, restarts):
        labels, _ = validate_labels(labels, None, self.limits, minimum=2)
        for name, value in (("eps", eps), ("step_size", step_size)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise RequestError(f"{name} must be a finite number >= 0, got {value}")
        if eps > self.limits.max_probe_eps:
            raise RequestError(f"eps {eps:.5f} is over the limit of {self.limits.max_probe_eps:.5f}")
        if not 0 <= steps <= self.limits.max_probe_steps:
            raise RequestError(f"steps must be in 0..{self.limits.max_probe_steps}")
        if not 1 <= restarts <= self.limits.max_probe_restarts:
            raise RequestError(f"restarts must be in 1..{self.limits.max_probe_restarts}")
        if true_label is not None and true_label not in labels:
            raise RequestError(f"true_label {true_label!r} is not one of the labels")
        return labels

    def probe(self, image: Image.Image, labels: Sequence[str], true_label: str | None = None, eps: float = 4 / 255,
              steps: int = 10, step_size: float | None = None, restarts: int = 1, seed: int = 0,
              return_images: bool = False, search_eps: bool = False) -> dict:
        labels = self._check_probe_args(labels, true_label, eps, steps, step_size, restarts)
        if not self.probe_slots.acquire(blocking=False):
            raise Busy(f"{self.limits.max_concurrent_probes} probes are already running; retry later")
        started = time.perf_counter()
        if self.limits.probe_threads:
            torch.set_num_threads(self.limits.probe_threads)  # OpenMP's setting is per calling thread
        try:
            with torch.no_grad():  # PGD turns gradients on where it needs them
                result = self._probe(image, labels, true_label, eps, steps, step_size, restarts, seed, return_images, search_eps)
        finally:
            self.probe_slots.release()
        elapsed = time.perf_counter() - started
        self.probes_run += 1
        self.probe_seconds += elapsed
        result["time_ms"] = round(1000 * elapsed, 1)
        return result

    def _attack(self, classifier, pixels, target, eps, steps, step_size, restarts, seed):
        """Untargeted PGD (CE on ``target``) with restarts; the restart with the lowest margin wins.
        Returns (adversarial pixels, their logits, margin)."""
        best = None
        for restart in range(restarts):
            attack = PGD(classifier, eps=eps, alpha=step_size if step_size is not None else eps / 4, steps=steps,
                         random_start=restarts > 1 or restart > 0, loss="ce", seed=seed + restart)
            adversarial = attack(pixels, target)
            logits = classifier(adversarial)[0]
            margin = _margin(logits, int(target[0]))
            if best is None or margin < best[2]:
                best = (adversarial, logits, margin)
            if margin < 0:
                break
        return best

    def _probe(self, image, labels, true_label, eps, steps, step_size, restarts, seed, return_images, search_eps):
        model = self.torch_model
        class_embeddings = torch.from_numpy(self.class_embeddings(labels)).float()
        classifier = _Deadline(ZeroShotClassifier(model, class_embeddings), self.limits.max_probe_seconds)
        pixels = torch.from_numpy(self.pixels([image]))
        # One forward+backward gives the clean prediction and the gradient sanity check: the probe
        # costs this pass, the attack's steps and one forward of the adversarial image.
        with torch.enable_grad():
            probe_input = pixels.clone().requires_grad_(True)
            logits = classifier(probe_input)
            clean_logits = logits[0].detach()
            clean_index = int(clean_logits.argmax())
            target_index = labels.index(true_label) if true_label is not None else clean_index
            target = torch.tensor([target_index])
            gradient, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target), probe_input)
        adversarial, adv_logits, _ = self._attack(classifier, pixels, target, eps, steps, step_size, restarts, seed)
        onnx_embeddings = self.encode_images(torch.cat([pixels, adversarial]).numpy())
        onnx_answers = self.classify_embeddings(onnx_embeddings, labels, class_embeddings.numpy(), 1)
        result = {
            "labels": labels,
            "target": labels[target_index],
            "eps": eps, "steps": steps, "step_size": step_size if step_size is not None else eps / 4, "restarts": restarts,
            "clean": _prediction(clean_logits, labels),
            "adversarial": _prediction(adv_logits, labels),
            "flipped": int(adv_logits.argmax()) != target_index,
            "margin_clean": _margin(clean_logits, target_index),
            "margin_adversarial": _margin(adv_logits, target_index),
            "served_onnx": {"clean": onnx_answers[0][0], "adversarial": onnx_answers[1][0],
                            "flipped": onnx_answers[1][0]["label"] != labels[target_index]},
            "linf_distance": float((adversarial - pixels).abs().max()),
            "sanity": {
                "zero_gradient": bool(gradient.abs().max() == 0),
                "clean_already_wrong": clean_index != target_index,
                "attack_did_nothing": eps == 0 or steps == 0,
            },
        }
        if return_images:
            delta = (adversarial - pixels)[0]
            amplified = (0.5 + 0.5 * delta / max(eps, 1e-12)).clamp(0, 1)
            result["adversarial_png"] = png_base64(_to_image(adversarial[0]))
            result["perturbation_png"] = png_base64(_to_image(amplified))
        if search_eps:
            result["eps_search"] = self._search_eps(classifier, pixels, target, steps, restarts, seed)
        return result

    def _search_eps(self, classifier, pixels, target, steps, restarts, seed) -> dict:
        grid = [e / 255 for e in (0.25, 0.5, 1, 2, 4, 8, 16, 32) if e / 255 <= self.limits.max_probe_eps + 1e-12]
        tried = []
        for eps in grid:
            *_, margin = self._attack(classifier, pixels, target, eps, max(steps, 1), None, restarts, seed)
            tried.append({"eps": eps, "margin": margin, "flipped": margin < 0})
            if margin < 0:
                return {"smallest_flipping_eps": eps, "smallest_flipping_eps_255": round(eps * 255, 3), "grid": tried}
        return {"smallest_flipping_eps": None, "grid": tried}

    def info(self) -> dict:
        m = self.manifest
        return {"model": m["model"], "method": m.get("method"), "pretrained": m.get("pretrained"),
                "quick_gelu": m["quick_gelu"], "prompt": m["prompt"], "image_size": m["inputs"]["image"]["shape"][-1],
                "tokenizer": m["tokenizer"],  # how to reproduce the text encoder's token ids
                "parity": {k: m["parity"][k] for k in ("max_abs_diff", "top1_agreement")},
                "onnx_provider": self.provider, "onnx_provider_note": self.provider_note, "limits": self.limits.to_dict(),
                "label_cache": {"hits": self.label_cache.hits, "misses": self.label_cache.misses},
                "probes_run": self.probes_run, "torch_threads": torch.get_num_threads()}


def _prediction(logits: torch.Tensor, labels: list[str]) -> dict:
    probs = torch.softmax(logits.float(), -1)
    index = int(probs.argmax())
    return {"label": labels[index], "probability": float(probs[index])}


def _margin(logits: torch.Tensor, target: int) -> float:
    others = torch.cat([logits[:target], logits[target + 1:]])
    return float(logits[target] - others.max())


def _to_image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
