"""ONNX export of a prompted CLIP: the image encoder takes pixels in [0, 1] (normalisation inside
the graph, so the served input space is the attack space); the text encoder has the learned prompts
baked in and takes token ids of the shortened context. Both output L2-normalised embeddings and
have a dynamic batch dimension (exported with a batch of 2: a batch of 1 would freeze it).

Export refuses to finish unless ONNX Runtime matches PyTorch (max |diff| of embeddings at batch 1
and 7, top-1 agreement of the full classifier on sample images, near ties aside: see check_parity).
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
from torch import nn

from capt.checkpoint import META_FILE, PROMPTS_FILE, load_prompted_model, resolve_checkpoint
from capt.models import save_clip_dir
from capt.prompts import PromptedCLIP

from .bundle import BUNDLE_FORMAT, IMAGE_ONNX, MANIFEST, TEXT_ONNX, load_bundle, onnx_session, sha256_of, tokenizer_layout

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


def _sample_images(model: PromptedCLIP, sample_data: str | None, count: int, seed: int) -> tuple[torch.Tensor, str]:
    size = model.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    if sample_data:
        from capt.data import load_dataset
        from capt.images import pixel_transform
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
        torch_similarity = (model.encode_image(sample_images) @ model.encode_text(tokens).t()).numpy()
    image_out = image_session.run(None, {"pixels": sample_images.numpy()})[0]
    text_out = text_session.run(None, {"tokens": tokens.numpy()})[0]
    return {"max_abs_diff": max(diffs.values()), "by_input": diffs,
            **top1_agreement(torch_similarity, image_out @ text_out.T)}


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Top-1 agreement of two ``[N, C]`` similarity matrices, near ties aside. A sample whose two best
    labels are closer (in the reference) than twice the largest measured difference between the
    matrices is a near tie: either answer is the model's, and with fp16 such ties flip by rounding,
    differently from CPU to CPU, so they cannot count as disagreements."""
    error = float(np.abs(candidate - reference).max())
    ranked = np.sort(reference, axis=-1)
    gap = ranked[:, -1] - ranked[:, -2] if ranked.shape[1] > 1 else np.full(len(ranked), np.inf)
    decisive = gap > 2 * error
    agree = candidate.argmax(-1) == reference.argmax(-1)
    return {"similarity_max_abs_diff": error,
            "top1_agreement": float(agree[decisive].mean()) if decisive.any() else float(agree.mean()),
            "top1_agreement_all": float(agree.mean()), "top1_near_ties": int((~decisive).sum()),
            "top1_samples": int(len(agree))}


def export_bundle(checkpoint: str | Path, output_dir: str | Path, pretrained: str | None = None,
                  labels: Sequence[str] | None = None, sample_data: str | None = None, sample_count: int = 64,
                  opset: int = DEFAULT_OPSET, seed: int = 0, precision: str = "fp32") -> dict:
    """Export, check parity and write the bundle to ``output_dir`` (which must not exist yet, and
    appears only once everything has passed). Returns the manifest.

    ``precision="fp16"`` stores the graphs' weights and activations in half precision (for GPUs:
    half the memory and tensor-core speed; on CPU ONNX Runtime runs it but gains nothing). Parity is
    still measured against the fp32 PyTorch model, with the looser bar of ``PARITY_BARS``; the PGD
    probe always runs the fp32 PyTorch model.

    The base CLIP travels in the bundle whatever its source (hub tag, ``.pt``/``.bin``/safetensors
    file, random weights): its architecture and fp32 weights in open_clip's ``local-dir`` layout, so
    the probe's twin is rebuilt from the bundle alone (see ``export/bundle.py``)."""
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
        files = [IMAGE_ONNX, TEXT_ONNX, PROMPTS_FILE, META_FILE, *save_clip_dir(model.base_clip, staging)]
        clip = model.clip
        manifest = {
            "format": BUNDLE_FORMAT,
            "model": model.model_name,
            "pretrained": model.pretrained,
            "quick_gelu": model.quick_gelu,
            "method": meta.get("method"),
            "prompt": model.config.to_dict(),
            "labels": labels,
            "precision": precision,
            "opset": opset,
            "inputs": {"image": {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, size, size],
                                 "range": [0.0, 1.0]},
                       "text": {"name": "tokens", "dtype": "int64",
                                "shape": ["batch", clip.context_length - model.config.text_n_ctx]}},
            "preprocess": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in model.preprocess_cfg.items()},
                           "normalisation": "inside the image graph"},
            "tokenizer": tokenizer_layout(model),
            "logit_scale": float(clip.logit_scale.exp()),
            "logit_bias": None if clip.logit_bias is None else float(clip.logit_bias),
            "parity": parity,
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - started, 2),
            "files": {name: sha256_of(staging / name) for name in files},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # The bundle as a server will load it: its twin rebuilt from the staged files alone must be the
        # model whose graphs were just checked.
        load_bundle(staging, ["CPUExecutionProvider"], check=True)
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by a server
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
