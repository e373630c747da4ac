"""The served image encoder: which of the ways this project can run a bundle's image graph serves it.

Candidates (``ENGINES``), each an :class:`ImageEngine` (``encode(pixels) -> embeddings``):

- ``onnx-fp32``: the bundle's graph in ONNX Runtime on the CPU, fp32. The reference: what the
  export's parity was measured on.
- ``onnx-int8``: the same graph with its MatMul weights quantised to int8 (ONNX Runtime dynamic
  quantisation, activations quantised at run time; as ``benchmarks/quantize.py``), made at start-up
  and cached by the graph's sha256 under ``CAPT_ENGINE_CACHE`` (default ``~/.cache/capt/engines``),
  run one image per call (``INT8_IMAGES_PER_RUN``: batch invariance, below).
- ``torch-bf16``: the bundle's PyTorch twin under bf16 autocast, its weights cast to bf16 once, run in
  chunks of one fixed size (batch invariance, below); offered on CPUs with native bf16 (AVX512_BF16 or
  AMX-BF16, :mod:`capt.hardware`).
- ``onnx-cuda-fp32``, ``onnx-cuda-fp16`` (the graph converted to fp16 with fp32 inputs and outputs)
  and ``tensorrt`` (ONNX Runtime's TensorRT provider with fp16 kernels allowed, where its libraries
  load; :func:`tensorrt_options`) on a CUDA machine.

:func:`choose_engine` builds the candidates the machine can run, runs a short self-test of each on
the bundle's sample images (the export's parity images: the toy world's for the default model,
seeded smooth random images otherwise) and serves the fastest one that is numerically safe: top-1
agreement with the fp32 graph of at least ``MIN_AGREEMENT`` (export's ``top1_agreement``, near ties
aside), and *batch invariance*: the embeddings of a few sample images encoded alone must equal their
embeddings inside larger mixed batches to ``MAX_BATCH_DIFF`` (max abs difference of the L2-normalised
embeddings). The server's micro-batcher (``serving/batching.py``) puts concurrent requests' images in
one encoder batch, so an engine that fails it answers a client according to other clients' requests.
ONNX Runtime's dynamic int8 quantisation does when it runs a batch (its activation scales are computed
over the whole input tensor): measured on the default model, AMD Zen 5, 3.7e-3 to 6.3e-3 for batched
int8, where onnx-fp32 differed by 0 (a GEMM's blocking may change with the batch size: ~1e-6 is fp32's
level). So onnx-int8 runs every image alone, its scales then its own: 0 since (2026-12-03). torch-bf16
did too (1.9e-3) until it ran fixed chunks (``FIXED_BATCHES``, below): 0 since.
A reduced-precision path must also beat the fastest fp32 path by ``MIN_GAIN``: a short timing
is noisy, and without a clear gain the exact path is worth more. Speed is the geometric mean of
images/s at batch 1 (a lone request) and at the sample batch (a loaded server), and a reduced path
that runs more than ``MIN_GAIN`` slower than fp32 at either of them is not chosen (:func:`slower_than`). The self-test is
bounded by ``budget_s`` (a few seconds; the sample batch shrinks for a slow model).

``CAPT_ENGINE`` (``ENGINES`` or ``auto``) overrides the choice; an override that cannot load or fails
the agreement test is refused with the reason (:class:`EngineError`): it was asked for explicitly,
so serving something else would be a surprise. An override that fails only batch invariance is
served (a user may knowingly want a batch-dependent path's speed), logged as a warning and reported as batch-dependent
(``batch_invariant: false`` and ``warning`` in the report, ``/info`` → ``image_engine``).
``onnx-fp32`` needs no self-test at all.

The server does not measure at every start: :func:`remembered_engine` and :func:`remembered_ort_threads`
keep what auto measured in the engine cache, and a later start on the same machine, with the same graph,
settings and code (:func:`choice_key`), serves the kept engine once its safety is rechecked
(``CAPT_ENGINE_RETUNE=1`` measures again). A choice measured while other processes loaded the CPUs is
served but not kept (``cpu_contention`` in the report; ``CAPT_ENGINE_KEEP_CONTENDED=1`` keeps it).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from capt.hardware import Hardware, autocast_factory, measuring_contention, reduced_dtype

logger = logging.getLogger("capt.serving")

REFERENCE = "onnx-fp32"
ENGINES = ("onnx-fp32", "onnx-int8", "torch-bf16", "onnx-cuda-fp32", "onnx-cuda-fp16", "tensorrt")
EXACT = ("onnx-fp32", "onnx-cuda-fp32")  # fp32 arithmetic, as the export's parity was measured
MIN_AGREEMENT = 0.99
MIN_GAIN = 1.10
DEFAULT_BUDGET_S = 4.0
DEFAULT_SAMPLES = 32
MIN_SAMPLES = 8
# Batch invariance: max |alone - in batch| of L2-normalised embeddings. fp32 ORT measured 0 on Zen 5
# (~1e-6 where a GEMM's blocking changes with the batch), int8 run as a batch 3.7e-3..6.3e-3 on Zen 5
# (3.1e-3..3.2e-3 on the Xeon of model 167): 1e-4 separates them.
MAX_BATCH_DIFF = 1e-4
BATCH_PROBES = 4  # sample images encoded alone


class EngineError(RuntimeError):
    """An explicitly requested engine cannot serve (unknown, failed to load, or disagrees with fp32)."""


@runtime_checkable
class ImageEngine(Protocol):
    name: str

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 pixels [N, 3, H, W] in [0, 1] -> float32 L2-normalised embeddings [N, D]."""


@dataclass
class OnnxEngine:
    name: str
    session: object
    # Larger batches run in parts: TensorRT's optimisation profile ends there; dynamic int8 runs one image
    # a call (INT8_IMAGES_PER_RUN), so that no image's activation scales depend on its neighbours.
    max_batch: int | None = None

    @property
    def details(self) -> dict:
        """What the self-test's report (``/info`` → ``image_engine``) says of how this engine runs a batch."""
        if self.name == "onnx-int8":
            return {"images_per_call": self.max_batch, "images_per_call_why": (
                "dynamic int8 computes its activation scales over the whole input, so each image runs alone "
                "and its answer does not depend on the other images of its batch")}
        return {"max_images_per_call": self.max_batch} if self.max_batch else {}

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        if self.max_batch and len(pixels) > self.max_batch:
            return np.concatenate([self.encode(pixels[i:i + self.max_batch])
                                   for i in range(0, len(pixels), self.max_batch)])
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]


# bf16 on a CPU: oneDNN's GEMM kernels (brgemm on AMX) block by the number of rows, so one image's bf16
# embedding changes with the size of its batch (ViT-B-32, Intel Xeon with AMX: alone vs inside 32 images,
# 1.4e-3; bit-identical only within runs of sizes, 1-5, 6-7, 8-12, ... there), but not with its neighbours
# or its place in a batch of a given size (0.0 measured). So the bf16 engine runs every batch as chunks of
# one fixed size, padding the last, and its answers do not depend on other requests.
FIXED_BATCHES = (1, 2, 4, 8, 16)
FIXED_BATCH_BUDGET_S = 2.0

# Dynamic int8 quantises each MatMul's input with one scale computed over the whole tensor, so a batched
# image's embedding moves with its neighbours (default model: 3.1e-3..6.3e-3, 30-60x MAX_BATCH_DIFF).
# One image a call makes the scales the image's own (0 measured). It costs little where one image fills
# the cores: on the default model's 1 thread (Xeon with AMX, model 167) one image a call ran 1,196 img/s
# at batch 32 against 1,054 batched, and fp32 batched 733.
INT8_IMAGES_PER_RUN = 1


def reduced_copy(twin, dtype: str = "bf16", device: str = "cpu"):
    """A copy of ``twin`` (eval mode) with its weights in ``dtype`` ("bf16" or "fp16"), for autocast
    without a cast of every weight at every call; ``twin`` itself stays as it is."""
    import copy
    return copy.deepcopy(twin).to(device=device, dtype=reduced_dtype(dtype)).eval()


@dataclass
class TorchAutocastEngine:
    """The PyTorch twin under autocast (``dtype`` "bf16" or "fp16") on ``device``, in chunks of
    ``fixed_batch`` images (None: the batch as it comes). ``model`` holds its weights in ``dtype``
    already (:meth:`from_twin`): autocast would otherwise cast every fp32 weight again at every call,
    which measured slower than fp32 itself (ViT-B-32 on an AMX Xeon, batch 32: 13.4 img/s re-casting,
    54.4 with the weights cast once, 19.7 fp32). On a CPU it computes on ``threads`` intra-op threads
    (0: PyTorch's default, one per core), the ONNX sessions' count, so that the core the server leaves to
    its event loop is left by every engine, and the self-test compares engines on the same cores."""
    name: str
    model: object
    dtype: str = "bf16"
    device: str = "cpu"
    fixed_batch: int | None = None
    details: dict = field(default_factory=dict)
    threads: int = 0

    @classmethod
    def from_twin(cls, name: str, twin, dtype: str = "bf16", device: str = "cpu", image_size: int | None = None,
                  budget_s: float = FIXED_BATCH_BUDGET_S, threads: int = 0,
                  recorded: dict | None = None) -> "TorchAutocastEngine":
        """A copy of ``twin`` with its weights in ``dtype`` (the twin itself stays fp32: the probe and the
        judge use it), and, given ``image_size``, the fixed chunk size that runs fastest here
        (:meth:`fastest_fixed_batch`); given ``recorded`` (an earlier start's self-test row), the chunk
        size that start measured, untimed."""
        engine = cls(name, reduced_copy(twin, dtype, device), dtype, device, threads=threads)
        if recorded is not None:
            if recorded.get("fixed_batch") not in FIXED_BATCHES:
                raise EngineError(f"recorded chunk size {recorded.get('fixed_batch')!r} is not one of {FIXED_BATCHES}")
            engine.fixed_batch = int(recorded["fixed_batch"])
            engine.details = {key: recorded[key] for key in ("fixed_batch", "fixed_batch_img_s", "fixed_batch_why")
                              if key in recorded}
        elif image_size:
            engine.fixed_batch, engine.details = engine.fastest_fixed_batch(image_size, budget_s)
        return engine

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        import torch
        before = torch.get_num_threads()
        # OpenMP's thread count is per calling thread: set for this call, and given back after it, so that
        # whatever else runs on this thread later (a probe, the start-up's timing) keeps its own.
        switch = bool(self.threads) and self.device == "cpu" and before != self.threads
        if switch:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode(), autocast_factory(self.dtype, self.device)():
                out = self.model.encode_image(
                    torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device))
        finally:
            if switch:
                torch.set_num_threads(before)
        return out.float().cpu().numpy()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        size = self.fixed_batch
        if not size:
            return self._run(pixels)
        count = len(pixels)
        padded = -(-count // size) * size
        if padded != count:  # padding rows repeat the last image; what they hold does not change the others
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], padded - count, axis=0)])
        return np.concatenate([self._run(pixels[i:i + size]) for i in range(0, padded, size)])[:count]

    def fastest_fixed_batch(self, image_size: int, budget_s: float = FIXED_BATCH_BUDGET_S,
                            sizes: Sequence[int] = FIXED_BATCHES) -> tuple[int, dict]:
        """The chunk size of ``sizes`` with the best geometric mean of a lone image's speed (1 / t) and a
        full chunk's (size / t), t the best time of one chunk, or the smallest within ``MIN_GAIN`` of it;
        larger sizes are skipped once ``budget_s`` is spent. Returns (size, details for the report)."""
        pixels = np.random.default_rng(0).random((max(sizes), 3, image_size, image_size), dtype=np.float32)
        started, seconds = time.perf_counter(), {}
        for size in sizes:
            if seconds and time.perf_counter() - started > budget_s:
                break
            chunk = pixels[:size]
            self._run(chunk)  # warm-up: oneDNN makes its kernels for a new shape at the first call
            seconds[size] = _best_time(lambda: self._run(chunk), 0.0, minimum=2, maximum=2)
        score = {size: math.sqrt(size) / t for size, t in seconds.items()}
        # Near ties go to the smaller chunk (a lone request's latency): a larger one must gain MIN_GAIN.
        best = min(size for size in score if score[size] * MIN_GAIN >= max(score.values()))
        return best, {"fixed_batch": best, "fixed_batch_img_s": {str(s): round(s / t, 1) for s, t in seconds.items()},
                      "fixed_batch_why": (f"every encoder call runs chunks of {best} images (bf16 kernels change "
                                          "with the batch size, so a fixed size keeps answers batch-invariant); "
                                          f"{best}: the smallest size within {MIN_GAIN:.2f}x of the best geometric mean of "
                                          "lone-image and full-chunk speed")}


@dataclass
class Candidate:
    name: str
    applies: bool  # by capability
    why: str
    build: Callable[[], ImageEngine]
    # The engine as an earlier start measured it (its self-test row), where building it times something
    # (torch-bf16's chunk size); None: ``build`` measures nothing, and serves for a recalled choice too.
    build_as_recorded: Callable[[dict], ImageEngine] | None = None


# ---- candidates -----------------------------------------------------------------------------------
def configured_cache_dir() -> Path:
    """The engine cache a start uses if it can write there: ``CAPT_ENGINE_CACHE``, default
    ``~/.cache/capt/engines`` (neither made nor probed here: :func:`cache_dir` does)."""
    return Path(os.environ.get("CAPT_ENGINE_CACHE") or Path.home() / ".cache" / "capt" / "engines")


FALLBACK_CACHE = Path(tempfile.gettempdir()) / "capt-engines"


def cache_dir() -> Path:
    """Where derived graphs (int8, fp16) are kept between starts, keyed by the source graph's sha256:
    :func:`configured_cache_dir`, made if missing, else (not writable) ``FALLBACK_CACHE``."""
    path = configured_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe of a name of its own: two threads of one process probing one name raced (one's unlink
        # failed, and it fell back to the temporary folder, with records and a lock of its own).
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
        return path
    except OSError:
        FALLBACK_CACHE.mkdir(parents=True, exist_ok=True)
        return FALLBACK_CACHE


class DerivedGraphFailed(RuntimeError):
    """Making a derived graph failed, now or at an earlier start (the failure is recorded beside the
    cache, so a restart does not spend the same seconds failing again)."""


STALE_PARTIAL_S = 3600.0  # no derived graph takes an hour to make; a partial file that old is a killed start's
STALE_PARTIAL_PATTERNS = (".image_encoder-*", ".choice-*.partial", ".text-*.partial")  # work files: graphs, kept
# choices, the self-test's class embeddings


def sweep_stale_partials(folder: Path, older_than_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Delete the hidden work files (``.image_encoder-*``: partial graphs, the int8 recipe's unannotated
    copy, the quantiser's inferred sibling; ``.choice-*.partial``: a kept choice being written) that a
    start killed while making a graph or keeping a choice left in ``folder``,
    once ``older_than_s`` old: for ViT-B-32 each is a full-size copy of its 350 MB graph. Files of a start
    still at work are younger and stay. Returns what was deleted."""
    deleted = _delete_older(folder, STALE_PARTIAL_PATTERNS, older_than_s)
    if deleted:
        logger.info("engine cache: deleted %d stale partial file(s) in %s", len(deleted), folder)
    return deleted


# What the engine cache holds, by name (``capt engines`` lists it): each kind and the code that writes it.
CACHE_KINDS = (("choice-*.json", "kept choice"),              # keep_choice
               ("choice-*.lock", "lock"),                     # _taking_turns
               ("image_encoder-*.onnx", "derived graph"),     # _derived_graph (int8, fp16)
               ("image_encoder-*.failed", "failure record"),  # _derived_graph
               ("text-*.npy", "class embeddings"),            # sample_class_embeddings
               ("tensorrt-*", "TensorRT engines"),            # tensorrt_options (a folder ONNX Runtime fills)
               (".*", "partial file"))                        # being written, or left by a killed start


def cache_entries(folder: Path) -> list[dict]:
    """Every file and folder of the engine cache ``folder``: name, kind (``CACHE_KINDS``; "other" for
    anything else), bytes (a folder's files summed) and last use (seconds since the epoch; every use marks
    a file, :func:`mark_used`; for a folder, its newest file, which ONNX Runtime writes). A kept choice
    also gives what it chose, when it was measured, what else used the CPUs meanwhile (``cpu_contention``,
    None in records older than that measurement), and whether a start of this code on this machine
    could still recall it (``current``: the code and machine of its key are these; its graph and settings
    are not checked here)."""
    entries = []
    this_machine, codes = None, {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".write-test-"):
            continue  # cache_dir()'s probe of a start at work
        kind = next((name for pattern, name in CACHE_KINDS if path.match(pattern)), "other")
        try:
            own = path.stat()
            files = [f.stat() for f in path.rglob("*") if f.is_file()] if path.is_dir() else [own]
        except OSError:
            continue  # deleted while listed
        entry = {"name": path.name, "kind": kind, "bytes": sum(st.st_size for st in files),
                 "last_used": max(st.st_mtime for st in [own, *files])}
        if kind == "kept choice":
            try:
                record = json.loads(path.read_text())
                key, value = record["key"], record["value"]
                if this_machine is None:
                    from capt.hardware import detect
                    this_machine = _machine_key(detect())
                sources = key.get("sources", CHOICE_SOURCES)
                this_code = codes.setdefault(tuple(sources), _sources_digest(sources))
                contention = value.get("cpu_contention")
                entry.update(choice=key.get("kind"), chosen=str(value.get("engine", value.get("used"))),
                             measured_at=record.get("measured_at"),
                             current=key.get("code") == this_code and key.get("machine") == this_machine,
                             # None: kept before contention was measured (older records hold none)
                             cpu_contention=contention if isinstance(contention, dict) else None)
            except Exception as err:  # noqa: BLE001 - an unreadable record is listed as such
                entry.update(choice=None, error=f"{type(err).__name__}: {err}"[:200], current=False)
        entries.append(entry)
    return entries


def clear_cache(folder: Path, older_than_s: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Delete the entries of :func:`cache_entries` last used over ``older_than_s`` ago (0: all of them).
    A server still running has its graphs loaded; its next start measures and makes them again.
    Returns (the entries deleted, those that could not be, each with its ``error``)."""
    import shutil
    deleted, failed, now = [], [], time.time()
    for entry in cache_entries(folder):
        if older_than_s and now - entry["last_used"] < older_than_s:
            continue
        path = folder / entry["name"]
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            deleted.append(entry)
        except FileNotFoundError:
            continue  # another start deleted it
        except OSError as err:  # a permission: said, and the rest still deleted
            failed.append({**entry, "error": f"{type(err).__name__}: {err}"})
    return deleted, failed


def _delete_older(folder: Path, patterns: Sequence[str], older_than_s: float) -> list[Path]:
    """Delete the files of ``folder`` matching ``patterns`` last modified over ``older_than_s`` ago."""
    deleted, now = [], time.time()
    for pattern in patterns:
        for path in folder.glob(pattern):
            try:
                if path.is_file() and now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    deleted.append(path)
            except OSError:
                continue  # another start deleted it, or the cache is read-only: nothing to do
    return deleted


UNUSED_S = 30 * 86400.0  # a derived graph, failure record or kept choice no start has used for 30 days
UNUSED_PATTERNS = tuple(pattern for pattern, kind in CACHE_KINDS if kind != "partial file")  # files; folders stay


def mark_used(path: Path) -> None:
    """Set ``path``'s modification time to now: it was used, so :func:`sweep_unused` keeps it."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache is never swept either


def sweep_unused(folder: Path, older_than_s: float = UNUSED_S) -> list[Path]:
    """Delete what no start has used for ``older_than_s`` (30 days): derived graphs of bundles no longer
    served (ViT-B-32's int8 graph is 100 MB), their failure records, and choices kept under keys that
    no longer occur (another version of the code or the libraries, another graph). Every use marks a file
    (:func:`mark_used`), so a file that is deleted is one no start has needed for that long; a server
    still running from it has its graph loaded, and its next start makes it again. Returns what was deleted."""
    deleted = _delete_older(folder, UNUSED_PATTERNS, older_than_s)
    if deleted:
        logger.info("engine cache: deleted %d file(s) unused for %.0f days in %s", len(deleted),
                    older_than_s / 86400, folder)
    return deleted


def _derived_graph(bundle, kind: str, make: Callable[[Path, Path], None]) -> Path:
    """The ``kind`` graph derived from the bundle's image graph by ``make(source, target)``, made once
    and cached by the source's sha256. A ``make`` that raises is recorded in ``<target>.failed`` (keyed
    by the onnxruntime version too, as another version may succeed) and re-raised at every later start
    without retrying; delete the file to retry. An ``OSError`` is not recorded: it says something about
    the machine, not the graph."""
    import onnxruntime

    from export.bundle import IMAGE_ONNX
    source = bundle.path / IMAGE_ONNX
    digest = bundle.manifest["files"][IMAGE_ONNX][:16]
    target = cache_dir() / f"image_encoder-{digest}-{kind}.onnx"
    failure = target.with_name(f"{target.name}.ort-{onnxruntime.__version__}.failed")
    sweep_stale_partials(target.parent)
    if failure.is_file():
        mark_used(failure)
        raise DerivedGraphFailed(f"{failure.read_text().strip()} (recorded at an earlier start in {failure}; "
                                 "delete it to retry)")
    if not target.is_file():
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            make(source, partial)
            os.replace(partial, target)  # atomic: a concurrent start sees a whole file or none
        except OSError:
            raise  # the machine's (a full disk, a permission), not the graph's: retried at the next start
        except Exception as err:
            message = f"making the {kind} graph failed: {type(err).__name__}: {err}"[:500]
            try:
                recorded = failure.with_name(f".{failure.name}.{os.getpid()}.partial")
                recorded.write_text(message + "\n")
                os.replace(recorded, failure)
            except OSError:
                pass  # an unwritable cache only costs the retry
            raise DerivedGraphFailed(message) from err
        finally:
            partial.unlink(missing_ok=True)
    mark_used(target)
    return target


def make_int8_graph(source: Path, target: Path) -> None:
    """``source``'s graph with int8 MatMul weights (ONNX Runtime dynamic quantisation: activations are
    quantised at run time) written to ``target``: the served onnx-int8's graph, and the benchmarks'.

    The graph's ``value_info`` (optional shape annotations of intermediate tensors) is dropped first:
    with it, the quantiser's own shape inference failed on ViT-B-32's export ("Inferred shape and
    existing shape differ in dimension 0: (512) vs (768)", onnxruntime 1.31); ONNX Runtime infers the
    shapes it needs when it loads a graph, so nothing it computes changes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    # Quantised from a copy beside ``target`` (in the engine cache), not from ``source``: the quantiser
    # writes its shape-inferred sibling next to its input, which in a bundle folder may be read-only or
    # shared by concurrent starts.
    unannotated = target.with_name(f".{target.name}.unannotated.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice, once per graph, is not ours to act on
    try:
        onnx.save(model, str(unannotated))
        del model  # the quantiser loads its own copy
        quantize_dynamic(unannotated, target, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        unannotated.unlink(missing_ok=True)


# The recipe's name in the cache: a new recipe makes its graph anew, and retries a graph that failed with
# an older one ("int8": value_info kept, which ViT-B-32's quantisation failed on).
INT8_RECIPE = "int8-unannotated"


def quantised_int8(bundle) -> Path:
    return _derived_graph(bundle, INT8_RECIPE, make_int8_graph)


def converted_fp16(bundle) -> Path:
    def make(source: Path, target: Path) -> None:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
    return _derived_graph(bundle, "fp16", make)


# TensorRT builds an engine per optimisation profile (minutes for ViT-B-32), so the served one covers
# every batch the server sends (up to Limits.max_batch, 64 by default) and the benchmarks' 256 in one
# profile, and its engines are kept between starts.
TENSORRT_MAX_BATCH = 256


def tensorrt_options(image_size: int, graph_digest: str, max_batch: int = TENSORRT_MAX_BATCH) -> dict:
    """ONNX Runtime TensorRT provider options of the ``tensorrt`` engine: fp16 kernels where TensorRT
    finds them faster (it keeps fp32 elsewhere; the self-test's agreement bar decides whether it
    serves), one optimisation profile for batches 1 to ``max_batch`` (optimised for 64), and the built
    engines and timing cache under ``cache_dir()/tensorrt-<graph_digest>``: ONNX Runtime names its
    cached engines by the graph's structure, not its weights, so two bundles of one architecture (or a
    re-export in place) must not share a folder."""
    def shape(batch: int) -> str:
        return f"pixels:{batch}x3x{image_size}x{image_size}"
    folder = str(cache_dir() / f"tensorrt-{graph_digest[:16]}")
    return {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": folder,
            "trt_timing_cache_enable": True, "trt_timing_cache_path": folder,
            "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(min(64, max_batch)),
            "trt_profile_max_shapes": shape(max_batch)}


def _tensorrt_engine(graph: Path, image_size: int, graph_digest: str) -> OnnxEngine:
    options = tensorrt_options(image_size, graph_digest)
    Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    return OnnxEngine("tensorrt", _session(graph, "TensorrtExecutionProvider", options=options), TENSORRT_MAX_BATCH)


def _session(path: Path, provider: str, threads: int = 0, options: dict | None = None):
    from export.bundle import onnx_session
    # TensorRT hands the nodes it cannot take to CUDA, as ONNX Runtime's documentation advises.
    fallbacks = {"CPUExecutionProvider": [], "TensorrtExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    providers = [provider, *fallbacks.get(provider, ["CPUExecutionProvider"])]
    session = onnx_session(path, providers, threads=threads, provider_options={provider: options} if options else None)
    if session.get_providers()[0] != provider:
        raise EngineError(f"ONNX Runtime fell back to {session.get_providers()[0]} instead of {provider}")
    return session


def candidates(bundle, hardware: Hardware, providers: Sequence[str] | None = None) -> list[Candidate]:
    """Every engine of ``ENGINES`` with whether this machine's capabilities make it worth trying."""
    from export.bundle import IMAGE_ONNX, cuda_unavailable_reason
    graph = bundle.path / IMAGE_ONNX
    image_size = int(bundle.manifest["inputs"]["image"]["shape"][-1])
    allowed = set(providers) if providers else None
    cpu_session = (bundle.image_session if bundle.image_session.get_providers()[0] == "CPUExecutionProvider"
                   else None)
    threads = bundle.ort_threads  # CAPT_ORT_THREADS, as for the bundle's own sessions
    x86 = hardware.arch.lower() in ("x86_64", "amd64", "i686", "x86")
    int8_ok = (x86 and hardware.avx2) or hardware.arch.lower() in ("aarch64", "arm64")
    cuda_reason = None
    try:
        cuda_reason = cuda_unavailable_reason()
    except Exception as err:  # noqa: BLE001
        cuda_reason = f"{type(err).__name__}: {err}"
    if cuda_reason is None and not hardware.cuda:
        cuda_reason = "no CUDA device in the hardware description"
    if cuda_reason is None and allowed is not None and "CUDAExecutionProvider" not in allowed:
        cuda_reason = "the caller restricted the providers to " + ", ".join(providers)
    trt_reason = cuda_reason or (None if "TensorrtExecutionProvider" in hardware.onnxruntime_providers
                                 else "this onnxruntime build has no TensorRT provider")
    return [
        Candidate("onnx-fp32", True, "the exported graph, as its parity was measured",
                  lambda: OnnxEngine("onnx-fp32", cpu_session or _session(graph, "CPUExecutionProvider", threads))),
        Candidate("onnx-int8", int8_ok,
                  ("int8 MatMuls" + (" with VNNI" if hardware.vnni else " (no VNNI: u8s8 dot products in AVX2)"))
                  if int8_ok else f"no fast int8 kernels known for {hardware.arch} without AVX2",
                  lambda: OnnxEngine("onnx-int8", _session(quantised_int8(bundle), "CPUExecutionProvider", threads),
                                     INT8_IMAGES_PER_RUN)),
        Candidate("torch-bf16", hardware.native_bf16_cpu,
                  "native bf16 on this CPU" if hardware.native_bf16_cpu else
                  "no native bf16 (AVX512_BF16 or AMX-BF16): PyTorch would emulate it, slower than fp32",
                  lambda: TorchAutocastEngine.from_twin("torch-bf16", bundle.twin, "bf16", "cpu", image_size,
                                                        threads=threads),
                  lambda row: TorchAutocastEngine.from_twin("torch-bf16", bundle.twin, "bf16", "cpu", threads=threads,
                                                            recorded=row)),
        Candidate("onnx-cuda-fp32", cuda_reason is None, cuda_reason or "CUDA provider and device",
                  lambda: OnnxEngine("onnx-cuda-fp32", _session(graph, "CUDAExecutionProvider"))),
        Candidate("onnx-cuda-fp16", cuda_reason is None, cuda_reason or "CUDA provider and device (graph converted to fp16)",
                  lambda: OnnxEngine("onnx-cuda-fp16", _session(converted_fp16(bundle), "CUDAExecutionProvider"))),
        Candidate("tensorrt", trt_reason is None, trt_reason or "TensorRT provider listed (fp16 kernels allowed)",
                  lambda: _tensorrt_engine(graph, image_size, bundle.manifest["files"][IMAGE_ONNX])),
    ]


# ---- ONNX Runtime threads -------------------------------------------------------------------------
# Auto intra-op threads of the served CPU sessions: one core is left to the worker's event loop, which
# is bound by one core (Python's GIL) and does the request handling, unless the image encoder itself is
# what limits the server (a large model on few cores): then every core. Measured on 2 cores of an AMD
# EPYC with the default model: 1 thread ran batches of 1-8 at 0.95-1.1 ms of CPU an image against
# 1.45-2.05 ms on 2 (wall time 0.95 against 1.51 ms at batch 1), and /classify served 1.25x the
# requests/s with 1 (README, Performance).
ALL_CORES_SPEEDUP = 1.3  # all cores are used only if the encoder runs this much faster on them
THREAD_TEST_BATCHES = (1, 8)


def ort_threads_choice(cores: int, seconds: dict[int, dict[int, float]] | None = None) -> tuple[int, str]:
    """(threads, why) from the encoder's best times ``seconds[threads][batch]`` with ``cores - 1`` and
    ``cores`` threads; ``seconds`` None where no measurement can change the answer."""
    fewer = max(1, cores - 1)
    if fewer == cores:
        return cores, "one usable core"
    if cores / fewer < ALL_CORES_SPEEDUP:
        return fewer, (f"one core left to the event loop: {cores} cores could run the encoder at most "
                       f"{cores / fewer:.2f}x faster than {fewer}, under the {ALL_CORES_SPEEDUP}x that would pay for it")
    speedup = float(np.exp(np.mean([np.log(seconds[fewer][b] / seconds[cores][b]) for b in seconds[fewer]])))
    if speedup >= ALL_CORES_SPEEDUP:
        return cores, (f"every core: the encoder ran {speedup:.2f}x faster on {cores} threads than on {fewer} "
                       f"(geometric mean of batches {', '.join(map(str, seconds[fewer]))}), so it limits the server")
    return fewer, (f"one core left to the event loop: the encoder ran only {speedup:.2f}x faster on {cores} threads "
                   f"than on {fewer} (under {ALL_CORES_SPEEDUP}x)")


def choose_ort_threads(graph: Path, image_size: int, cores: int, budget_s: float = 2.0) -> tuple[int, dict]:
    """Auto ONNX Runtime threads for the served graphs (``ort_threads_choice``; ``cores``: the machine's
    ``Hardware.compute_cores``, SMT siblings counted once, within a container's CPU quota), timing the image
    encoder ``graph`` with ``cores - 1`` and ``cores`` threads where that can change the answer
    (within about ``budget_s`` of runs, plus two session starts)."""
    started = time.perf_counter()
    fewer = max(1, cores - 1)
    seconds = None
    if fewer != cores and cores / fewer >= ALL_CORES_SPEEDUP:
        rng = np.random.default_rng(0)
        inputs = {b: rng.random((b, 3, image_size, image_size), dtype=np.float32) for b in THREAD_TEST_BATCHES}
        seconds = {}
        for threads in (fewer, cores):
            session = _session(graph, "CPUExecutionProvider", threads)
            seconds[threads] = {}
            for batch, pixels in inputs.items():
                session.run(None, {"pixels": pixels})  # warm-up
                seconds[threads][batch] = _best_time(lambda: session.run(None, {"pixels": pixels}),
                                                     budget_s / (2 * len(inputs)), minimum=2)
    threads, reason = ort_threads_choice(cores, seconds)
    report = {"used": threads, "reason": reason, "seconds": round(time.perf_counter() - started, 3)}
    if seconds:
        report["images_per_s"] = {str(t): {str(b): round(b / s, 1) for b, s in by_batch.items()}
                                  for t, by_batch in seconds.items()}
    return threads, report


# ---- self-test ------------------------------------------------------------------------------------
def sample_set(bundle, count: int = DEFAULT_SAMPLES) -> tuple[np.ndarray, np.ndarray, str]:
    """(pixels [N, 3, S, S], class embeddings of the manifest's labels, what the images are): the
    export's parity images where they can be remade here (a procedural data set such as the toy
    world's), else seeded smooth random images, as the export uses without sample data. The class
    embeddings are of at most ``SELF_TEST_MAX_LABELS`` labels (:func:`self_test_labels`)."""
    import torch
    manifest, twin = bundle.manifest, bundle.twin
    size = manifest["inputs"]["image"]["shape"][-1]
    sample = str(manifest.get("parity", {}).get("sample", "synthetic"))
    pixels, name = None, "synthetic (seeded smooth random images)"
    if sample.startswith("toyworld_"):
        try:
            from capt.data import load_dataset
            from capt.images import pixel_transform
            dataset_name, _, split = sample.partition(":")
            data = load_dataset(f"{dataset_name}::{split or 'test'}", pixel_transform(twin.preprocess_cfg))
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
            pixels, name = torch.stack([data.dataset[i][0] for i in order.tolist()]).numpy(), sample
        except Exception as err:  # noqa: BLE001 - fall back to synthetic images, and say so
            logger.info("engine self-test: could not remake the sample images %s (%s)", sample, err)
    if pixels is None:
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(count, 3, 4, 4, generator=generator)
        pixels = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1).numpy()
    text = sample_class_embeddings(bundle, self_test_labels(manifest["labels"]))
    return np.ascontiguousarray(pixels, dtype=np.float32), text, name


TEXT_FORMAT = 1  # of the kept class embeddings' key


def _library_versions() -> dict:
    """The versions of what tokenises and runs the text graph (a kept file is recomputed after an upgrade)."""
    from importlib import metadata
    versions = {}
    for name in ("open_clip_torch", "onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def sample_class_embeddings(bundle, labels: Sequence[str]) -> np.ndarray:
    """The text graph's embeddings of ``labels`` (the self-test's classes), kept in the engine cache as
    ``.npy`` (read without pickle), keyed by the sha256 of every bundle file, the labels, this code and
    the library versions: computed once per bundle, not at every start (ViT-B-32's text encoder took
    2.0 s for 64 labels on 2 cores of the Xeon of model 167). A kept file that is unreadable or not of
    the right shape (labels x the text graph's width) is computed anew."""
    width = bundle.text_session.get_outputs()[0].shape[-1]  # the embedding width (the batch is symbolic)
    key = json.dumps({"format": TEXT_FORMAT, "files": bundle.manifest["files"], "labels": list(labels),
                      "code": _sources_digest(), "libraries": _library_versions()}, sort_keys=True)
    path = None
    with contextlib.suppress(Exception):
        path = cache_dir() / f"text-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path is not None:
        try:
            with open(path, "rb") as f:  # the .npy format only (np.load would also open zip archives)
                kept = np.lib.format.read_array(f, allow_pickle=False)
            if (kept.dtype == np.float32 and kept.ndim == 2 and len(kept) == len(labels)
                    and (kept.shape[1] == width or not isinstance(width, int)) and np.isfinite(kept).all()):
                mark_used(path)
                return kept
            logger.warning("engine cache: %s is not %d finite float32 embeddings of width %s; computing them again",
                           path, len(labels), width)
        except FileNotFoundError:
            pass  # not kept yet
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the embeddings are computed
            logger.warning("engine cache: could not read %s (%s: %s); computing it again", path, type(err).__name__,
                           err)
    tokens = bundle.twin.tokenize(list(labels))
    text = np.ascontiguousarray(bundle.text_session.run(None, {"tokens": tokens.numpy()})[0], dtype=np.float32)
    if path is not None:
        _write_atomically(path, lambda f: np.save(f, text, allow_pickle=False))
    return text


# The self-test's top-1 agreement is measured over at most this many of the manifest's labels: their text
# embeddings are computed at a bundle's first start (then kept: sample_class_embeddings), and ViT-B-32's
# text encoder took 2.0 s for 64 labels and 28.0 s for 640 on 2 cores of the Xeon of model 167 (an
# ImageNet manifest has 1,000).
SELF_TEST_MAX_LABELS = 64


def self_test_labels(labels: Sequence[str], limit: int = SELF_TEST_MAX_LABELS) -> list[str]:
    """``labels``, or a seeded subset of ``limit`` of them in their order where there are more."""
    labels = list(labels)
    if len(labels) <= limit:
        return labels
    keep = np.sort(np.random.default_rng(0).choice(len(labels), size=limit, replace=False))
    return [labels[i] for i in keep]


def _best_time(fn: Callable[[], object], budget_s: float, minimum: int = 1, maximum: int = 10) -> float:
    """Fastest of repeated calls of ``fn`` (after the caller's warm-up), at least ``minimum``, within ``budget_s``."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < maximum and (len(times) < minimum or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)


def batch_dependence(engine: ImageEngine, samples: np.ndarray, in_sample_batch: np.ndarray,
                     probes: int = BATCH_PROBES) -> float:
    """Max abs difference between the L2-normalised embeddings of the first ``probes`` samples encoded
    alone and the same images inside two larger batches: the sample batch (``in_sample_batch``, its
    embeddings, already computed) and a mixed one, the images last after the other samples' negatives
    (other neighbours, other positions, other pixel statistics). 0 for a batch-invariant engine."""
    probes = max(1, min(probes, len(samples) - 1))
    alone = np.concatenate([np.asarray(engine.encode(samples[i:i + 1]), dtype=np.float32) for i in range(probes)])
    mixed = np.ascontiguousarray(np.concatenate([1.0 - samples[probes:], samples[probes - 1::-1]]), dtype=np.float32)
    in_mixed = np.asarray(engine.encode(mixed), dtype=np.float32)[-probes:][::-1]
    alone = _normalised(alone)
    return float(max(np.abs(alone - _normalised(in_sample_batch[:probes])).max(),
                     np.abs(alone - _normalised(in_mixed)).max()))


def batch_verdict(difference: float) -> str:
    return f"answers depend on batch composition: max |alone - in batch| = {difference:.2g} > {MAX_BATCH_DIFF:g}"


def self_test(engine: ImageEngine, samples: np.ndarray, text: np.ndarray, reference: np.ndarray | None,
              budget_s: float) -> tuple[dict, np.ndarray]:
    """Agreement of ``engine`` with the ``reference`` embeddings (None: it is the reference) on
    ``samples``, its batch invariance (:func:`batch_dependence`), and its speed at batch 1 and at the
    sample batch, within about ``budget_s``."""
    embeddings = _embeddings(engine, samples)  # also the warm-up of the big batch
    one = samples[:1]
    engine.encode(one)  # warm-up of batch 1
    b1 = _best_time(lambda: engine.encode(one), budget_s / 3, minimum=2)
    bn = _best_time(lambda: engine.encode(samples), budget_s * 2 / 3, minimum=1)
    result = {"img_s_b1": round(1 / b1, 1), "img_s_batch": round(len(samples) / bn, 1), "batch": len(samples)}
    result["speed"] = round(math.sqrt(result["img_s_b1"] * result["img_s_batch"]), 1)
    result.update(safety(engine, samples, embeddings, text, reference))
    return result, embeddings


def _embeddings(engine: ImageEngine, samples: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(engine.encode(samples), dtype=np.float32)
    if not np.isfinite(embeddings).all():
        raise EngineError("non-finite embeddings")
    return embeddings


def safety(engine: ImageEngine, samples: np.ndarray, embeddings: np.ndarray, text: np.ndarray,
           reference: np.ndarray | None) -> dict:
    """The self-test's safety measurements of ``engine`` (``embeddings``: its embeddings of ``samples``):
    batch invariance (:func:`batch_dependence`) and, against the ``reference`` embeddings (None: it is
    the reference), top-1 agreement over the class embeddings ``text`` and the embeddings' distance."""
    from export.onnx_export import top1_agreement
    difference = batch_dependence(engine, samples, embeddings)
    result = {"batch_max_abs_diff": float(f"{difference:.3g}"), "batch_invariant": difference <= MAX_BATCH_DIFF}
    if reference is not None:
        agreement = top1_agreement(reference @ text.T, embeddings @ text.T)
        cosine = float(np.min(np.sum(embeddings * reference, -1)
                              / (np.linalg.norm(embeddings, axis=-1) * np.linalg.norm(reference, axis=-1))))
        result.update({"top1_agreement": round(agreement["top1_agreement"], 4),
                       "top1_near_ties": agreement["top1_near_ties"],
                       "embedding_max_abs_diff": round(float(np.abs(embeddings - reference).max()), 5),
                       "min_cosine": round(cosine, 5)})
    else:
        result.update({"top1_agreement": 1.0, "top1_near_ties": 0, "embedding_max_abs_diff": 0.0, "min_cosine": 1.0})
    return result


def slower_than(row: dict, exact: dict) -> str | None:
    """Where the self-test row ``row`` ran more than ``MIN_GAIN`` slower than ``exact`` (the fastest fp32
    path): at batch 1 (a lone request) or at the sample batch (a loaded server); None if at neither. A
    geometric mean can hide a loss: onnx-int8 run one image a call on 2 threads, default model, Xeon
    model 167, measured 1.79x fp32 at batch 1 and 0.75x at batch 32 (geometric mean 1.16x)."""
    for key, what in (("img_s_b1", "batch 1"), ("img_s_batch", f"batch {exact.get('batch')}")):
        if row[key] * MIN_GAIN < exact[key]:
            return f"{row[key] / exact[key]:.2f}x the fp32 path at {what}"
    return None


@dataclass
class EngineChoice:
    engine: ImageEngine
    report: dict = field(default_factory=dict)


def choose_engine(bundle, hardware: Hardware, override: str | None = "auto", providers: Sequence[str] | None = None,
                  budget_s: float = DEFAULT_BUDGET_S, sample_count: int = DEFAULT_SAMPLES,
                  extra: Sequence[Candidate] = ()) -> tuple[ImageEngine, dict]:
    """The engine to serve ``bundle`` with and a report of every candidate (applies, why, loaded,
    images/s, agreement, verdict). ``override``: one of ``ENGINES`` (refused with :class:`EngineError`
    if it cannot load or disagrees with fp32) or "auto"/None. ``extra``: more candidates (tests)."""
    started = time.perf_counter()
    override = (override or "auto").strip()
    pool = {c.name: c for c in [*candidates(bundle, hardware, providers), *extra]}
    if override != "auto" and override not in pool:
        raise EngineError(f"CAPT_ENGINE={override!r} is not an engine; choose auto or one of {', '.join(pool)}")
    precision = bundle.manifest.get("precision", "fp32")
    reference_candidate = pool[REFERENCE]
    if precision != "fp32":
        # An fp16 bundle's graph is already the reduced one: served as exported, on its own session.
        engine = OnnxEngine(f"bundle-{precision}", bundle.image_session)
        if override not in ("auto", REFERENCE):
            raise EngineError(f"CAPT_ENGINE={override}: engines are chosen for fp32 bundles; this bundle is {precision}")
        return engine, {"engine": engine.name, "override": override, "self_test": False,
                        "reason": f"a {precision} bundle is served as exported ({engine.provider})", "batch_invariant": None,
                        "candidates": [], "seconds": round(time.perf_counter() - started, 3)}
    if override == REFERENCE:
        engine = reference_candidate.build()
        return engine, {"engine": REFERENCE, "override": override, "self_test": False,
                        "reason": "CAPT_ENGINE=onnx-fp32: the exported graph, no self-test needed", "batch_invariant": None,
                        "candidates": [{"name": REFERENCE, "applies": True, "why": reference_candidate.why,
                                        "loaded": True, "verdict": "chosen (override)"}],
                        "seconds": round(time.perf_counter() - started, 3)}
    tried = [pool[override]] if override != "auto" else [c for c in pool.values() if c.applies and c.name != REFERENCE]
    rows = [{"name": c.name, "applies": c.applies, "why": c.why} for c in pool.values()
            if c.name != REFERENCE and c.name not in {t.name for t in tried}]
    for row in rows:
        row["verdict"] = "not tried: " + row["why"]
    if override == "auto" and not tried:
        engine = reference_candidate.build()
        return engine, {"engine": REFERENCE, "override": override, "self_test": False,
                        "reason": "the only path this machine offers (no other candidate applies)", "batch_invariant": None,
                        "candidates": [{"name": REFERENCE, "applies": True, "why": reference_candidate.why,
                                        "loaded": True, "verdict": "chosen (only candidate)"}, *rows],
                        "seconds": round(time.perf_counter() - started, 3)}

    phase_started = time.perf_counter()
    reference_engine = reference_candidate.build()
    phases = {"reference_load": round(time.perf_counter() - phase_started, 3)}
    # The sample batch is sized so that every candidate's test fits the budget: the reference's time per
    # image (batch 2, after a warm-up) sets it, between MIN_SAMPLES and sample_count images.
    phase_started = time.perf_counter()
    all_samples, text, sample_name = sample_set(bundle, sample_count)
    phases["samples"] = round(time.perf_counter() - phase_started, 3)
    reference_engine.encode(all_samples[:2])
    per_image = _best_time(lambda: reference_engine.encode(all_samples[:2]), 0.0, minimum=3) / 2
    per_candidate = budget_s / (len(tried) + 1)
    count = int(min(sample_count, max(MIN_SAMPLES, per_candidate / 4 / max(per_image, 1e-6))))
    samples = all_samples[:count]
    measured: dict[str, dict] = {}
    engines: dict[str, ImageEngine] = {}
    phase_started = time.perf_counter()
    ref_result, reference = self_test(reference_engine, samples, text, None, per_candidate)
    measured[REFERENCE] = {"name": REFERENCE, "applies": True, "why": reference_candidate.why, "loaded": True,
                           **ref_result, "test_seconds": round(time.perf_counter() - phase_started, 3)}
    engines[REFERENCE] = reference_engine
    for candidate in tried:
        row = {"name": candidate.name, "applies": candidate.applies, "why": candidate.why}
        load_started = time.perf_counter()
        try:
            engine = candidate.build()
            row["load_seconds"] = round(time.perf_counter() - load_started, 3)
            row.update(getattr(engine, "details", None) or {})  # e.g. torch-bf16's fixed chunk size
            test_started = time.perf_counter()
            result, _ = self_test(engine, samples, text, reference, per_candidate)
            row.update(loaded=True, **result, test_seconds=round(time.perf_counter() - test_started, 3))
            engines[candidate.name] = engine
        except Exception as err:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal (auto)
            row.update(loaded=False, error=f"{type(err).__name__}: {err}"[:300], machine_error=isinstance(err, OSError))
        measured[candidate.name] = row

    def agrees(row: dict) -> bool:
        return row.get("loaded", False) and row.get("top1_agreement", 0.0) >= MIN_AGREEMENT

    def safe(row: dict) -> bool:
        # The reference is what the others are judged against: served whatever its own measurement says.
        return agrees(row) and (row["batch_invariant"] or row["name"] == REFERENCE)

    for row in measured.values():
        if not row.get("loaded"):
            row["verdict"] = f"rejected: failed to load ({row['error']})"
        elif not agrees(row):
            row["verdict"] = (f"rejected: top-1 agreement with fp32 {row['top1_agreement']:.2%} < "
                              f"{MIN_AGREEMENT:.0%}")
        elif not safe(row):
            row["verdict"] = "rejected: " + batch_verdict(row["batch_max_abs_diff"])
    if not measured[REFERENCE]["batch_invariant"]:
        logger.warning("engine self-test: the reference %s itself %s", REFERENCE,
                       batch_verdict(measured[REFERENCE]["batch_max_abs_diff"]))
    warning = None
    if override != "auto":
        row = measured[override]
        if not agrees(row):
            raise EngineError(f"CAPT_ENGINE={override} cannot serve this bundle: {row['verdict'].removeprefix('rejected: ')}"
                              "; unset CAPT_ENGINE (or set auto) to let the server choose")
        chosen, reason = override, (f"CAPT_ENGINE={override}: passed the self-test (top-1 agreement "
                                    f"{row['top1_agreement']:.2%}, {row['speed']:g} img/s vs fp32 "
                                    f"{measured[REFERENCE]['speed']:g})")
        row["verdict"] = "chosen (override)"
        measured[REFERENCE].setdefault("verdict", "the reference the override was tested against")
        if not row["batch_invariant"]:
            warning = (f"CAPT_ENGINE={override} is batch-dependent: its {batch_verdict(row['batch_max_abs_diff'])}, "
                       "so a client's answers change with other requests sharing its micro-batch; served because "
                       "it was asked for explicitly (unset CAPT_ENGINE to let the server choose a batch-invariant one)")
            reason = (f"CAPT_ENGINE={override}: passed the agreement test (top-1 agreement {row['top1_agreement']:.2%}, "
                      f"{row['speed']:g} img/s vs fp32 {measured[REFERENCE]['speed']:g}) but is batch-dependent")
            row["verdict"] = "chosen (override), batch-dependent: " + batch_verdict(row["batch_max_abs_diff"])
            logger.warning("image encoder: %s", warning)
    else:
        passing = [r for r in measured.values() if safe(r)]
        exact = [r for r in passing if r["name"] in EXACT]
        best_exact = max(exact, key=lambda r: r["speed"])
        for row in passing:
            loss = slower_than(row, best_exact) if row["name"] not in EXACT else None
            if loss:
                row["verdict"] = f"safe, but {loss}: a reduced-precision path must not lose where fp32 is faster"
        best = max((r for r in passing if "verdict" not in r), key=lambda r: r["speed"])
        if best["name"] in EXACT or best["speed"] < MIN_GAIN * best_exact["speed"]:
            if best["name"] not in EXACT:
                best["verdict"] = (f"safe, but {best['speed'] / best_exact['speed']:.2f}x the fp32 path: under the "
                                   f"{MIN_GAIN:.2f}x a reduced-precision path must gain")
            best = best_exact
        chosen = best["name"]
        ratio = best["speed"] / measured[REFERENCE]["speed"]
        reason = (f"fastest safe path measured: {best['speed']:g} img/s (geometric mean of batch 1 and "
                  f"{best['batch']}), {ratio:.2f}x onnx-fp32, top-1 agreement {best['top1_agreement']:.2%}"
                  if chosen != REFERENCE else
                  f"onnx-fp32: no reduced-precision path was safe, at least {MIN_GAIN:.2f}x faster in the geometric "
                  f"mean and not {MIN_GAIN:.2f}x slower at batch 1 or {best_exact['batch']} (each row's verdict says why)")
        for row in passing:
            row.setdefault("verdict", f"safe, slower ({row['speed']:g} img/s)")
        measured[chosen]["verdict"] = "chosen"
    report = {"engine": chosen, "override": override, "self_test": True, "reason": reason,
              "batch_invariant": bool(measured[chosen]["batch_invariant"]), "warning": warning,
              "min_agreement": MIN_AGREEMENT, "min_gain": MIN_GAIN, "max_batch_diff": MAX_BATCH_DIFF,
              "samples": {"images": count, "source": sample_name},
              "candidates": [*measured.values(), *rows], "phases_seconds": phases,
              "seconds": round(time.perf_counter() - started, 3)}
    return engines[chosen], report


# ---- measured choices, kept between starts --------------------------------------------------------
# What auto measured at a start (the ONNX Runtime threads, the engine) is kept in the engine cache, keyed
# by what the measurement depended on: the graph's sha256, this machine's description (``capt.hardware``:
# CPU, features, cores, CPU quota, CUDA devices, the python, torch and onnxruntime versions), the
# settings (threads, providers, the candidates and why they apply, the environment variables that steer
# the libraries' kernels and threads: ``KERNEL_ENV_PREFIXES``), the derived graphs' failure records, and
# the source of the files whose code makes or times the choice (``CHOICE_SOURCES``), so that a change to
# how choices are made invalidates every kept one. A later start with the same key serves the kept
# engine after rechecking its safety now (top-1 agreement and batch invariance on the sample images, not
# its speed): on ViT-B-32, 2 cores of the Xeon of model 167, 2026-12-03, a start whose derived graphs
# were already made took 6.5-9.1 s measuring the threads and 13.7-14.8 s the engine, and a recalling
# start 0.0 s and 3.9-5.3 s (``benchmarks.engine_startup``, two runs); 1.4 s once the self-test's class
# embeddings were kept too (:func:`sample_class_embeddings`, one run).
# ``CAPT_ENGINE_RETUNE=1`` measures again, and keeps what it measured. A measurement during which other
# processes used a quarter of the usable CPUs' time, or the cgroup's quota throttled a tenth of it
# (:func:`capt.hardware.measuring_contention`), is served but not kept: timings taken beside a neighbour
# would pin a choice for an idle machine, and nothing in the key sees load; ``CAPT_ENGINE_KEEP_CONTENDED=1``
# keeps it anyway (a host that is always that busy). An explicit ``CAPT_ENGINE`` is tested at every start. Workers starting together take turns (a file lock): the first measures, the
# others wait and recall, rather than all timing at once on the same cores.
RETUNE_ENV = "CAPT_ENGINE_RETUNE"
KEEP_CONTENDED_ENV = "CAPT_ENGINE_KEEP_CONTENDED"
CHOICE_FORMAT = 1
KERNEL_ENV_PREFIXES = ("ONEDNN_", "DNNL_", "OMP_", "KMP_", "MKL_", "GOMP_", "ORT_")
_REPO = Path(__file__).resolve().parent.parent
CHOICE_SOURCES = ("serving/engine.py", "export/bundle.py", "export/onnx_export.py", "capt/hardware.py")


def retune_requested() -> bool:
    return os.environ.get(RETUNE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _sources_digest(sources: Sequence[str] = CHOICE_SOURCES) -> str:
    digest = hashlib.sha256()
    for name in sources:
        try:
            digest.update((_REPO / name).read_bytes())
        except OSError:  # installed without sources (bytecode only): the package version must do
            from importlib import metadata
            try:
                digest.update(f"{name} of capt-server {metadata.version('capt-server')}".encode())
            except metadata.PackageNotFoundError:
                digest.update(f"{name} unreadable".encode())
    return digest.hexdigest()


def choice_key(kind: str, hardware: Hardware, sources: Sequence[str] = CHOICE_SOURCES, **settings) -> dict:
    """What a ``kind`` measurement depended on, as JSON values (a kept record must match it exactly).
    ``sources``: the files (from the repository root) whose code makes or times it."""
    kernel_env = {name: value for name, value in os.environ.items() if name.startswith(KERNEL_ENV_PREFIXES)}
    key = {"kind": kind, "format": CHOICE_FORMAT, "sources": list(sources), "code": _sources_digest(sources),
           "machine": _machine_key(hardware), "environment": kernel_env, **settings}
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _machine_key(hardware: Hardware) -> dict:
    """The machine's part of a choice's key, as JSON values: its description without the prose."""
    machine = hardware.to_dict()
    machine.pop("why", None)  # prose about the machine, not a fact of it
    return json.loads(json.dumps(machine, sort_keys=True, default=str))


def _choice_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"choice-{key['kind']}-{digest}.json"


def recall_choice(key: dict) -> dict | None:
    """The record (``value``, ``measured_at``, ``file``) that an earlier start kept for ``key``, or None:
    none kept, ``CAPT_ENGINE_RETUNE`` set, or no cache, or a file that is unreadable or holds another key."""
    if retune_requested():
        return None
    path = None
    try:
        path = _choice_path(key)
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the cache, the choice is measured
        logger.warning("engine cache: not recalling a measured choice from %s (%s: %s)", path, type(err).__name__, err)
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("value"), dict):
        return None
    mark_used(path)
    return {"value": record["value"], "measured_at": str(record.get("measured_at")), "file": str(path)}


def keep_choice(key: dict, value: dict) -> None:
    """Keep ``value`` for ``key`` (atomically: a concurrent start reads a whole record or none). A cache
    that cannot be written only costs the next start its measurement."""
    try:
        path = _choice_path(key)
        record = {"key": key, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "value": value}
        text = json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"
    except Exception as err:  # noqa: BLE001
        logger.info("engine cache: could not keep the measured choice (%s: %s)", type(err).__name__, err)
        return
    _write_atomically(path, lambda f: f.write(text.encode()))


def _write_atomically(path: Path, write: Callable) -> None:
    """``write(binary file)`` into a hidden ``.<name>.*.partial`` beside ``path``, then renamed onto it: a
    concurrent start reads a whole file or none. A cache that cannot be written is logged, not raised
    (it only costs the next start its work)."""
    partial = None
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        partial = Path(name)
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.chmod(partial, 0o644)  # as the graphs beside it (mkstemp makes it readable by its owner only)
        os.replace(partial, path)
    except Exception as err:  # noqa: BLE001
        if partial is not None:
            partial.unlink(missing_ok=True)
        logger.info("engine cache: could not write %s (%s: %s)", path.name, type(err).__name__, err)


MEASURING_LOCK = "choice-measuring.lock"


@contextlib.contextmanager
def _taking_turns(sweep: bool = False):
    """An exclusive lock on the cache's one lock file (``MEASURING_LOCK``) for the time of a
    recall-or-measure: workers that start together measure one at a time, and the later ones recall the
    first's choice. One lock for every kind of choice and every bundle: the probe's precision timed by one
    worker while another rechecks its engine, or two servers timing at once, would time each other's load.
    Without a lock (no cache, no ``fcntl``), everyone goes on unlocked, as before. With ``sweep``, at the
    end, what no start has used for 30 days is swept from the cache (:func:`sweep_unused`): the engine's
    choice sweeps, the last step of a start to use the cache, once its graphs and records are marked."""
    handle = None
    try:
        import fcntl
        path = cache_dir() / MEASURING_LOCK
        handle = open(path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        mark_used(path)
    except Exception as err:  # noqa: BLE001
        logger.info("engine cache: measuring without a lock (%s: %s)", type(err).__name__, err)
        if handle is not None:
            handle.close()
        handle = None
    try:
        yield
    finally:
        if handle is not None:
            try:
                if sweep:
                    sweep_unused(Path(handle.name).parent)  # after this start marked what it used
            finally:
                handle.close()  # closing releases the lock


def _failure_records(bundle) -> list[str]:
    """The derived graphs' failure records of this bundle's graph (``_derived_graph``): deleting one to
    retry must also retry the choice that was made while it stood."""
    from export.bundle import IMAGE_ONNX
    try:
        digest = bundle.manifest["files"][IMAGE_ONNX][:16]
        return sorted(p.name for p in cache_dir().glob(f"image_encoder-{digest}-*.failed"))
    except Exception:  # noqa: BLE001
        return []


def _recalled_note(record: dict) -> str:
    return (f"measured by an earlier start on this machine ({record['measured_at']}) and kept in {record['file']}; "
            f"{RETUNE_ENV}=1 measures again")


def remembered(key: dict, measure: Callable[[], dict], usable: Callable[[dict], bool]) -> dict:
    """``measure()``'s report (a JSON-able dict with a ``reason``), measured once per ``key``
    (:func:`choice_key`) and recalled by later starts while ``usable(kept report)`` holds; workers
    starting together take turns. A recalled report gains ``recalled`` (when it was measured, the file,
    the measurement's own ``seconds``) and says so in its ``reason``; ``seconds`` is this start's."""
    started = time.perf_counter()
    with _taking_turns():
        record = recall_choice(key)
        if record is not None and usable(record["value"]):
            value = record["value"]
            return {**value, "seconds": round(time.perf_counter() - started, 3),
                    "recalled": {"measured_at": record["measured_at"], "file": record["file"],
                                 "seconds": value.get("seconds")},
                    "reason": f"{value.get('reason')} ({_recalled_note(record)})"}
        report = _measured_and_kept(key, measure)
    return report


def _measured_and_kept(key: dict, measure: Callable[[], dict],
                       keepable: Callable[[dict], bool] = lambda report: True) -> dict:
    """``measure()``'s report with ``cpu_contention`` (what else used this process's CPUs meanwhile:
    :func:`capt.hardware.measuring_contention`), kept for ``key`` unless ``keepable(report)`` says no or
    the measurement was contended: a timing of other processes' load is not a fact about this machine,
    and kept, it would decide every later start. A contended one serves this start only (``kept``:
    false and ``not_kept`` in the report) and the next start measures again."""
    with measuring_contention() as contention:
        report = measure()
    report["cpu_contention"] = contention.to_dict()
    if contention.contended and not keep_contended_requested():
        report["kept"] = False
        report["not_kept"] = (f"measured while {contention.describe()}: the next start measures again "
                              f"({KEEP_CONTENDED_ENV}=1 keeps it)")
        logger.warning("engine cache: not keeping the %s choice, %s", key.get("kind"), report["not_kept"])
    elif keepable(report):
        keep_choice(key, report)
    return report


def keep_contended_requested() -> bool:
    """``CAPT_ENGINE_KEEP_CONTENDED=1``: keep choices measured under other processes' load too (a host
    that is never idle would otherwise measure at every start)."""
    return os.environ.get(KEEP_CONTENDED_ENV, "").strip().lower() not in ("", "0", "false", "no")


def remembered_ort_threads(graph: Path, graph_digest: str, image_size: int, hardware: Hardware) -> dict:
    """:func:`choose_ort_threads`'s report for ``graph`` on this machine, measured once and recalled by
    later starts (``recalled`` in the report says when it was measured)."""
    key = choice_key("ort-threads", hardware, graph=graph_digest, image_size=image_size,
                     cores=hardware.compute_cores)

    def usable(report: dict) -> bool:
        used = report.get("used")
        return type(used) is int and 1 <= used <= max(hardware.compute_cores, 1)
    return remembered(key, lambda: choose_ort_threads(graph, image_size, hardware.compute_cores)[1], usable)


def remembered_engine(bundle, hardware: Hardware, override: str | None = "auto",
                      providers: Sequence[str] | None = None,
                      extra: Sequence[Candidate] = ()) -> tuple[ImageEngine, dict]:
    """:func:`choose_engine`, its auto choice measured once per key (:func:`choice_key`) and recalled by
    later starts: the kept engine is built as measured and serves once its safety, rechecked now on the
    sample images (top-1 agreement with fp32 and batch invariance), still holds; otherwise, or where it
    cannot be built, the paths are measured again. An explicit ``override`` and a reduced-precision
    bundle go to :func:`choose_engine` every time."""
    from export.bundle import IMAGE_ONNX
    override = (override or "auto").strip()
    if override != "auto" or bundle.manifest.get("precision", "fp32") != "fp32":
        return choose_engine(bundle, hardware, override, providers, extra=extra)
    started = time.perf_counter()
    pool = {c.name: c for c in [*candidates(bundle, hardware, providers), *extra]}
    key = choice_key("engine", hardware, graph=bundle.manifest["files"][IMAGE_ONNX], ort_threads=bundle.ort_threads,
                     providers=list(providers) if providers else None,
                     candidates=[[c.name, c.applies, c.why] for c in pool.values()],
                     samples=str(bundle.manifest.get("parity", {}).get("sample", "synthetic")),
                     failure_records=_failure_records(bundle))
    with _taking_turns(sweep=True):
        record = recall_choice(key)
        if record is not None:
            try:
                return _recalled_engine(bundle, pool, record, started)
            except Exception as err:  # noqa: BLE001 - a kept choice that no longer holds is measured again
                logger.warning("image encoder: the choice kept in %s no longer holds (%s: %s); measuring again",
                               record["file"], type(err).__name__, err)
        chosen: list[ImageEngine] = []

        def measure() -> dict:
            engine, report = choose_engine(bundle, hardware, "auto", providers, extra=extra)
            chosen.append(engine)
            return report

        # Not a choice made while a path failed for a passing reason of the machine (a full disk, a
        # permission); a path that fails for what it is (no TensorRT libraries) fails the same next time.
        report = _measured_and_kept(key, measure, lambda report: not any(row.get("machine_error")
                                                                         for row in report["candidates"]))
    return chosen[0], report


def _recalled_engine(bundle, pool: dict[str, Candidate], record: dict, started: float) -> tuple[ImageEngine, dict]:
    report = record["value"]
    chosen = report["engine"]
    row = next(r for r in report["candidates"] if r["name"] == chosen)
    candidate = pool[chosen]
    phase_started = time.perf_counter()
    engine = candidate.build_as_recorded(row) if candidate.build_as_recorded else candidate.build()
    recheck: dict = {"build_seconds": round(time.perf_counter() - phase_started, 3)}
    if chosen != REFERENCE:  # the exported fp32 graph is the reference: nothing to recheck
        count = int(report["samples"]["images"])
        phase_started = time.perf_counter()
        samples, text, _ = sample_set(bundle, count)
        recheck["samples_seconds"] = round(time.perf_counter() - phase_started, 3)
        phase_started = time.perf_counter()
        reference = _embeddings(pool[REFERENCE].build(), samples)
        recheck["reference_seconds"] = round(time.perf_counter() - phase_started, 3)
        phase_started = time.perf_counter()
        recheck.update(images=count, **safety(engine, samples, _embeddings(engine, samples), text, reference))
        recheck["safety_seconds"] = round(time.perf_counter() - phase_started, 3)
        if recheck["top1_agreement"] < MIN_AGREEMENT:
            raise EngineError(f"{chosen}: top-1 agreement with fp32 {recheck['top1_agreement']:.2%} < {MIN_AGREEMENT:.0%}")
        if not recheck["batch_invariant"]:
            raise EngineError(f"{chosen}: {batch_verdict(recheck['batch_max_abs_diff'])}")
    seconds = round(time.perf_counter() - started, 3)
    recheck["seconds"] = seconds
    return engine, {**report, "seconds": seconds,
                    "reason": f"{report['reason']} ({_recalled_note(record)}; its safety rechecked at this start)",
                    "recalled": {"measured_at": record["measured_at"], "file": record["file"],
                                 "seconds": report.get("seconds"), "recheck": recheck}}
