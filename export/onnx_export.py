"""ONNX export of a prompted CLIP: the image encoder takes pixels in [0, 1] (normalisation inside
the graph, so the served input space is the attack space); the text encoder has the learned prompts
baked in and takes token ids of the shortened context. Both output L2-normalised embeddings and
have a dynamic batch dimension (exported with a batch of 2: a batch of 1 would freeze it).

Export refuses to finish unless ONNX Runtime matches PyTorch (max |diff| of embeddings at batch 1
and 7, top-1 agreement of the full classifier on sample images).
"""
from __future__ import annotations

import copy
import json
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from capt.checkpoint import META_FILE, PROMPTS_FILE, load_prompted_model, resolve_checkpoint
from capt.prompts import PromptedCLIP

from .bundle import BUNDLE_FORMAT, MANIFEST, sha256_of

IMAGE_ONNX, TEXT_ONNX = "image_encoder.onnx", "text_encoder.onnx"
BASE_WEIGHTS = "base_weights.safetensors"
DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16")
# Parity bars per precision: max |ONNX - torch fp32| of L2-normalised embeddings, top-1 agreement.
# fp16 rounds every weight and activation (relative error ~5e-4 each); the default model measures 1.6e-4.
PARITY_BARS = {"fp32": (1e-4, 1.0), "fp16": (2e-3, 0.98)}
_PARITY_BATCHES = (1, 7)


class ExportParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond tolerance; nothing was written."""


class EncoderGraph(nn.Module):
    """One encoder of a PromptedCLIP (``"encode_image"`` or ``"encode_text"``) as a module to export.
    Inputs and outputs stay fp32 (or int64 tokens) whatever the model's precision, so a client and
    the service never see the difference between an fp32 and an fp16 bundle."""

    def __init__(self, model: PromptedCLIP, method: str):
        super().__init__()
        self.model, self.method = model, method
        self.dtype = next(model.parameters()).dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        return getattr(self.model, self.method)(inputs).float()


def _export(module: nn.Module, example: torch.Tensor, input_name: str, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name], output_names=["embeddings"],
                      dynamic_shapes=({0: batch},), dynamo=True, opset_version=opset,
                      external_data=False, verbose=False)


def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot use the CUDA provider here, or None when it can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider; install onnxruntime-gpu"
    if not torch.cuda.is_available():  # onnxruntime-gpu lists CUDA even without a GPU, then fails loudly
        return "no CUDA device or driver is visible"
    return None


def onnx_session(path: str | Path, providers: Sequence[str] | None = None, spinning: bool = False):
    """An ONNX Runtime session on the first usable of ``providers`` (default CUDA, then CPU);
    ``session.get_providers()[0]`` says which one runs.

    ``spinning`` lets ONNX Runtime's CPU threads busy-wait between runs (its default). That is about
    10% faster for a process that does nothing else, but in the server those threads took the cores
    from PyTorch (probes) and from request handling: a 10-step probe took 1.5x ten forward+backward
    passes with spinning and about 1x without, so sessions do not spin unless asked to."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if cuda_unavailable_reason() is not None:
        available = [p for p in available if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    wanted = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
    if "CUDAExecutionProvider" in wanted and hasattr(ort, "preload_dlls"):
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
    return ort.InferenceSession(str(path), sess_options=options, providers=wanted or ["CPUExecutionProvider"])


def _sample_images(model: PromptedCLIP, sample_data: str | None, count: int, seed: int) -> tuple[torch.Tensor, str]:
    size = model.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    if sample_data:
        from capt.data import load_dataset
        from capt.models import pixel_transform
        data = load_dataset(sample_data, pixel_transform(model.preprocess_cfg))
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
        return torch.stack([data.dataset[i][0] for i in order.tolist()]), data.name
    # No data given: smooth random images (blurred noise) rather than white noise.
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1), "synthetic"


def _versions() -> dict[str, str]:
    names = {"torch": "torch", "open_clip": "open_clip_torch", "onnx": "onnx", "onnxruntime": "onnxruntime-gpu",
             "onnxscript": "onnxscript", "capt": "capt-server"}
    versions = {"python": platform.python_version()}
    for key, dist in names.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = "not installed"
    return versions


def check_parity(model: PromptedCLIP, image_path: Path, text_path: Path, labels: Sequence[str],
                 sample_images: torch.Tensor) -> dict:
    image_session, text_session = onnx_session(image_path, ["CPUExecutionProvider"]), onnx_session(text_path, ["CPUExecutionProvider"])
    size = sample_images.shape[-1]
    generator = torch.Generator().manual_seed(0)
    diffs = {}
    for batch in _PARITY_BATCHES:
        pixels = torch.rand(batch, 3, size, size, generator=generator)
        tokens = model.tokenize([f"{labels[i % len(labels)]} {i}" for i in range(batch)])
        with torch.no_grad():
            image_ref, text_ref = model.encode_image(pixels).numpy(), model.encode_text(tokens).numpy()
        image_out = image_session.run(None, {"pixels": pixels.numpy()})[0]
        text_out = text_session.run(None, {"tokens": tokens.numpy()})[0]
        diffs[f"image_batch_{batch}"] = float(np.abs(image_out - image_ref).max())
        diffs[f"text_batch_{batch}"] = float(np.abs(text_out - text_ref).max())
    tokens = model.tokenize(list(labels))
    with torch.no_grad():
        text_ref = model.encode_text(tokens)
        torch_top1 = model.logits(model.encode_image(sample_images), text_ref).argmax(-1).numpy()
    image_out = image_session.run(None, {"pixels": sample_images.numpy()})[0]
    text_out = text_session.run(None, {"tokens": tokens.numpy()})[0]
    onnx_top1 = (image_out @ text_out.T).argmax(-1)
    return {"max_abs_diff": max(diffs.values()), "by_input": diffs,
            "top1_agreement": float((onnx_top1 == torch_top1).mean()), "top1_samples": int(len(torch_top1))}


def export_bundle(checkpoint: str | Path, output_dir: str | Path, pretrained: str | None = None,
                  labels: Sequence[str] | None = None, sample_data: str | None = None, sample_count: int = 64,
                  opset: int = DEFAULT_OPSET, seed: int = 0, include_base_weights: bool = True,
                  precision: str = "fp32") -> dict:
    """Export, check parity and write the bundle to ``output_dir`` (which must not exist yet, and
    appears only once everything has passed). Returns the manifest.

    ``precision="fp16"`` stores the graphs' weights and activations in half precision (for GPUs:
    half the memory and tensor-core speed; on CPU ONNX Runtime runs it but gains nothing). Parity is
    still measured against the fp32 PyTorch model, with the looser bar of ``PARITY_BARS``; the PGD
    probe always runs the fp32 PyTorch model.

    With ``include_base_weights`` the CLIP weights travel in the bundle (copied when they come from
    a local file, saved when random), so the probe can rebuild the model anywhere; weights named by
    a hub tag are only referenced."""
    output_dir = Path(output_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} exists; export writes a new folder")
    started = time.perf_counter()
    checkpoint_dir = resolve_checkpoint(checkpoint)
    model, meta = load_prompted_model(checkpoint_dir, pretrained=pretrained)
    labels = list(labels or meta.get("classnames") or ["cat", "dog"])
    sample_images, sample_name = _sample_images(model, sample_data, sample_count, seed)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        size = sample_images.shape[-1]
        graph_model = copy.deepcopy(model).half() if precision == "fp16" else model
        _export(EncoderGraph(graph_model, "encode_image"), torch.rand(2, 3, size, size), "pixels", staging / IMAGE_ONNX, opset)
        _export(EncoderGraph(graph_model, "encode_text"), model.tokenize(labels[:1] * 2), "tokens", staging / TEXT_ONNX, opset)
        del graph_model
        parity = check_parity(model, staging / IMAGE_ONNX, staging / TEXT_ONNX, labels, sample_images)
        parity["sample"] = sample_name
        tolerance, min_agreement = PARITY_BARS[precision]
        parity["bar"] = {"max_abs_diff": tolerance, "top1_agreement": min_agreement}
        if parity["max_abs_diff"] > tolerance or parity["top1_agreement"] < min_agreement:
            raise ExportParityError(f"ONNX Runtime ({precision}) disagrees with PyTorch: max |diff| "
                                    f"{parity['max_abs_diff']:.2e} (tolerance {tolerance:g}), top-1 agreement "
                                    f"{parity['top1_agreement']:.2%} (needs {min_agreement:.0%})")
        shutil.copy2(checkpoint_dir / PROMPTS_FILE, staging / PROMPTS_FILE)
        shutil.copy2(checkpoint_dir / META_FILE, staging / META_FILE)
        files = [IMAGE_ONNX, TEXT_ONNX, PROMPTS_FILE, META_FILE]
        if include_base_weights and model.pretrained is None:
            save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, staging / BASE_WEIGHTS)
            files.append(BASE_WEIGHTS)
        elif include_base_weights and Path(model.pretrained).is_file() and Path(model.pretrained).suffix == ".safetensors":
            shutil.copy2(model.pretrained, staging / BASE_WEIGHTS)
            files.append(BASE_WEIGHTS)
        clip = model.clip
        n_ctx = model.config.text_n_ctx
        manifest = {
            "format": BUNDLE_FORMAT,
            "model": model.model_name,
            "pretrained": model.pretrained,
            "method": meta.get("method"),
            "prompt": model.config.to_dict(),
            "labels": labels,
            "precision": precision,
            "opset": opset,
            "inputs": {"image": {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, size, size],
                                 "range": [0.0, 1.0]},
                       "text": {"name": "tokens", "dtype": "int64", "shape": ["batch", clip.context_length - n_ctx]}},
            "preprocess": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in model.preprocess_cfg.items()},
                           "normalisation": "inside the image graph"},
            "tokenizer": {"type": "open_clip", "model": model.model_name,
                          "context_length": clip.context_length - n_ctx, "model_context_length": clip.context_length,
                          "prompt_tokens": n_ctx, "template": model.config.template},
            "logit_scale": float(clip.logit_scale.exp()),
            "logit_bias": None if clip.logit_bias is None else float(clip.logit_bias),
            "parity": parity,
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - started, 2),
            "base_weights": BASE_WEIGHTS if BASE_WEIGHTS in files else None,
            "files": {name: sha256_of(staging / name) for name in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by a server
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
