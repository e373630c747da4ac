"""The exported bundle: the contract between export and serving. Its layout, its verification and
the one loader that gives a server everything it needs live here.

A bundle is a folder, self-contained (nothing outside it is read to serve it)::

    manifest.json                 format, sha256 of every file below, tokenizer layout, logit scale/bias,
                                  preprocessing, parity figures and the bar they were held to
    image_encoder.onnx            pixels in [0, 1] -> L2-normalised embeddings (normalisation inside)
    text_encoder.onnx             token ids (prompted layout, see ``tokenizer``) -> L2-normalised embeddings
    prompts.safetensors           the learned prompts
    prompt_config.json            their configuration and training record
    open_clip_config.json         the base CLIP's architecture (activation included) and preprocessing,
    open_clip_model.safetensors   and its fp32 weights: open_clip's own ``local-dir:`` layout

A bundle is only used after :func:`verify_bundle` has checked every file, so a truncated copy or a
tampered graph is refused with a message that names the file. :func:`load_bundle` also rebuilds the
probe's PyTorch twin from the bundle alone and compares it with the ONNX graphs on fixed inputs
(:func:`check_twin`): a twin that is not the model ``classify`` serves is refused, naming the graph.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from capt.checkpoint import META_FILE, PROMPTS_FILE
from capt.models import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "capt-bundle/2"
IMAGE_ONNX, TEXT_ONNX = "image_encoder.onnx", "text_encoder.onnx"
BUNDLE_FILES = (IMAGE_ONNX, TEXT_ONNX, PROMPTS_FILE, META_FILE, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class BundleError(RuntimeError):
    """A bundle is incomplete, tampered with, of an unknown format, or its parts disagree."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing (not an exported bundle)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: unknown format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}"
                          + (" (exported by an older version: export it again with `capt export`)"
                             if str(manifest.get("format", "")).startswith("capt-bundle/") else ""))
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256, and that every file a bundle needs is
    listed; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    missing = [name for name in BUNDLE_FILES if name not in manifest["files"]]
    if missing:
        raise BundleError(f"{bundle_dir / MANIFEST}: lists no {', '.join(missing)} (a bundle is self-contained)")
    for name, expected in manifest["files"].items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise BundleError(f"{bundle_dir / MANIFEST}: file entry '{name}' is not a plain file name")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        if sha256_of(path) != expected:
            raise BundleError(f"{path}: sha256 does not match the manifest (corrupted or tampered)")
    return manifest


def save_to_model_store(bundle_dir: str | Path, name: str, metadata: dict | None = None) -> str:
    """Copy a verified bundle into the BentoML model store; returns the model tag. ``metadata`` is
    recorded beside the manifest's summary."""
    import bentoml

    if not _MODEL_NAME.match(name):
        raise ValueError(f"model name '{name}' must be lower-case letters, digits, '.', '_' or '-'")
    manifest = verify_bundle(bundle_dir)
    # BentoML metadata takes no None values.
    summary = {key: manifest[key] if manifest[key] is not None else "none"
               for key in ("format", "model", "pretrained", "quick_gelu", "method", "opset", "precision")}
    summary["parity_max_abs_diff"] = manifest["parity"]["max_abs_diff"]
    summary["files"] = manifest["files"]
    summary.update(metadata or {})
    with bentoml.models.create(name, module="export", labels={"format": "onnx"}, metadata=summary) as model_ref:
        for file in [MANIFEST, *manifest["files"]]:
            shutil.copy2(Path(bundle_dir) / file, Path(model_ref.path) / file)
    verify_bundle(model_ref.path)
    return str(model_ref.tag)


def bundle_path_from_store(tag: str) -> Path:
    """The verified folder of a bundle in the BentoML model store."""
    import bentoml

    path = Path(bentoml.models.get(tag).path)
    verify_bundle(path)
    return path


# ---- ONNX Runtime ---------------------------------------------------------------------------------
def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot use the CUDA provider here, or None when it can."""
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider; install onnxruntime-gpu"
    if not torch.cuda.is_available():  # onnxruntime-gpu lists CUDA even without a GPU, then fails loudly
        return "no CUDA device or driver is visible"
    return None


def onnx_session(path: str | Path, providers: Sequence[str] | None = None, spinning: bool = False, threads: int = 0,
                 provider_options: dict[str, dict] | None = None):
    """An ONNX Runtime session on the first usable of ``providers`` (default CUDA, then CPU);
    ``session.get_providers()[0]`` says which one runs. ``threads``: intra-op threads of its CPU
    kernels; 0 is ONNX Runtime's default (one per physical core). ``provider_options``: options by
    provider name (e.g. TensorRT's fp16 and engine cache, ``serving.engine.tensorrt_options``).

    ``spinning`` lets ONNX Runtime's CPU threads busy-wait between runs (its default). That is about
    10% faster for a process that does nothing else, but in the server those threads took the cores
    from PyTorch (probes) and from request handling: a 10-step probe took 1.5x ten forward+backward
    passes with spinning and about 1x without, so sessions do not spin unless asked to."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if cuda_unavailable_reason() is not None:
        available = [p for p in available if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    wanted = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(wanted) and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the pip wheels that torch brings (no CUDA base image needed)
            ort.preload_dlls(directory="")
        except Exception:  # noqa: BLE001 - no GPU libraries: CPU it is
            pass
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ORT_ENABLE_ALL adds CPU layout rewrites that crash ONNX Runtime 1.31 on fp16 graphs (segfault at
    # session creation); EXTENDED measured as fast on our fp32 graphs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads < 0:
        raise ValueError(f"ONNX Runtime threads must be >= 0 (0: its default), got {threads}")
    options.intra_op_num_threads = threads
    options_of = provider_options or {}
    chosen = [(p, options_of[p]) if p in options_of else p for p in wanted or ["CPUExecutionProvider"]]
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


# ---- tokenizer layout -----------------------------------------------------------------------------
def tokenizer_layout(model) -> dict[str, Any]:
    """How a client reproduces the text encoder's token ids for a label (``model``: a PromptedCLIP).
    With learned text prompts, the template's first ``dropped_template_tokens`` words are replaced by
    the learned context, so their ids are cut out after tokenising; the graph inserts the context."""
    clip = model.clip
    n_ctx = model.config.text_n_ctx
    prefix = model.config.template.split("{}")[0].strip()
    prefix_ids = model.tokenizer.encode(prefix) if prefix else []
    dropped = model.n_dropped if n_ctx else 0
    return {
        "type": "open_clip", "class": type(model.tokenizer).__name__, "model": model.model_name,
        "context_length": clip.context_length - n_ctx, "model_context_length": clip.context_length,
        "prompt_tokens": n_ctx, "template": model.config.template,
        "dropped_template_tokens": dropped, "dropped_token_ids": [int(i) for i in prefix_ids[:dropped]],
        "sot_token_id": getattr(model.tokenizer, "sot_token_id", None),
        "eot_token_id": getattr(model.tokenizer, "eot_token_id", None),
        "recipe": ("ids = tokenizer(template.format(label), context_length=context_length + dropped_template_tokens); "
                   "tokens = ids[:1] + ids[1 + dropped_template_tokens:]" if n_ctx else
                   "tokens = tokenizer(template.format(label), context_length=context_length)"),
    }


# ---- the loader -----------------------------------------------------------------------------------
@dataclass
class Bundle:
    """Everything a server needs from a verified bundle."""
    path: Path
    manifest: dict[str, Any]
    image_session: Any
    text_session: Any
    twin: Any  # capt.prompts.PromptedCLIP: the probe's PyTorch model, rebuilt from the bundle alone
    ort_threads: int = 0  # intra-op threads of its ONNX Runtime sessions (0: ONNX Runtime's default)

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        return self.manifest.get("logit_bias")

    @property
    def provider(self) -> str:
        return self.image_session.get_providers()[0]


def load_twin(bundle_dir: str | Path, manifest: dict[str, Any]):
    """The prompted PyTorch model of a bundle: base CLIP from its ``local-dir`` files, prompts from
    its safetensors. Nothing of this machine's model registry or of the exporting machine is read."""
    from capt.checkpoint import read_checkpoint
    from capt.models import load_clip_dir
    from capt.prompts import PromptConfig, PromptedCLIP

    meta, state = read_checkpoint(bundle_dir)
    clip = load_clip_dir(bundle_dir)
    if clip.quick_gelu != bool(manifest.get("quick_gelu")):
        raise BundleError(f"{Path(bundle_dir) / OPEN_CLIP_CONFIG}: quick_gelu={clip.quick_gelu}, the manifest says "
                          f"{manifest.get('quick_gelu')}")
    model = PromptedCLIP(clip, PromptConfig.from_dict(meta["prompt"]))
    model.load_prompt_state_dict(state)
    model.model_name = manifest["model"]
    return model.eval()


def load_bundle(bundle_dir: str | Path, providers: Sequence[str] | None = None, check: bool = True,
                ort_threads: int = 0, verified_manifest: dict[str, Any] | None = None) -> Bundle:
    """Verify the files, open the ONNX sessions (``ort_threads`` intra-op threads each, 0: ONNX Runtime's
    default), rebuild the twin and (``check``) compare the two. ``verified_manifest``: what this process's
    own ``verify_bundle`` of the folder just returned (the files are not hashed a second time)."""
    bundle_dir = Path(bundle_dir)
    manifest = verified_manifest if verified_manifest is not None else verify_bundle(bundle_dir)
    bundle = Bundle(bundle_dir, manifest, onnx_session(bundle_dir / IMAGE_ONNX, providers, threads=ort_threads),
                    onnx_session(bundle_dir / TEXT_ONNX, providers, threads=ort_threads), load_twin(bundle_dir, manifest),
                    ort_threads)
    if check:
        check_twin(bundle)
    return bundle


def twin_differences(bundle: Bundle) -> dict[str, float]:
    """Max |twin - ONNX| of the embeddings on fixed inputs (seeded pixels, the manifest's labels),
    with the graphs run by ONNX Runtime on the CPU (the provider the export's parity was measured on)."""
    import torch

    twin, manifest = bundle.twin, bundle.manifest
    size = manifest["inputs"]["image"]["shape"][-1]
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1234))
    tokens = twin.tokenize(list(manifest["labels"])[:8])
    with torch.no_grad():
        image_ref, text_ref = twin.encode_image(pixels).numpy(), twin.encode_text(tokens).numpy()
    image = onnx_session(bundle.path / IMAGE_ONNX, ["CPUExecutionProvider"]).run(None, {"pixels": pixels.numpy()})[0]
    text = onnx_session(bundle.path / TEXT_ONNX, ["CPUExecutionProvider"]).run(None, {"tokens": tokens.numpy()})[0]
    return {IMAGE_ONNX: float(np.abs(image - image_ref).max()), TEXT_ONNX: float(np.abs(text - text_ref).max())}


def check_twin(bundle: Bundle) -> dict[str, float]:
    """Refuse a bundle whose PyTorch twin is not the model its graphs compute (beyond the parity bar
    the export was held to), or whose logit scale/bias are not the twin's; returns the differences."""
    bar = bundle.manifest["parity"]["bar"]["max_abs_diff"]
    differences = twin_differences(bundle)
    over = {name: diff for name, diff in differences.items() if not diff <= bar}
    if over:
        raise BundleError(f"{bundle.path}: the probe's PyTorch twin disagrees with " + ", ".join(
            f"{name} (max |diff| {diff:.2e} > the parity bar {bar:g})" for name, diff in over.items())
            + "; the probe would attack another model than the one served")
    clip = bundle.twin.clip
    scale = float(clip.logit_scale.exp())
    bias = None if clip.logit_bias is None else float(clip.logit_bias)
    if not np.isclose(scale, bundle.logit_scale, rtol=1e-6) or (bias is None) != (bundle.logit_bias is None) \
            or (bias is not None and not np.isclose(bias, bundle.logit_bias, rtol=1e-6)):
        raise BundleError(f"{bundle.path}: logit scale/bias of the twin ({scale}, {bias}) differ from the manifest's "
                          f"({bundle.logit_scale}, {bundle.logit_bias})")
    return differences
