"""Model factory: a CLIP model, its preprocessing and tokenizer from a name and a pretrained source.

Names are open_clip architectures plus this project's JSON configs in ``models/`` (registered with
open_clip, the way open_clip keeps its own). The pretrained source is one of
- ``None`` / ``"none"``: random weights (tests, pretraining from scratch);
- a path to a local checkpoint (``.safetensors``, or a ``.pt``/``.bin`` state dict loaded with
  ``torch.load(weights_only=True)``, so nothing is unpickled);
- an open_clip pretrained tag such as ``"openai"`` (needs the network or a warm hub cache).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from PIL import Image
from torchvision import transforms

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG_DIR = Path(os.environ.get("CAPT_MODEL_DIR", REPO_ROOT / "models"))
_registered = False


def register_model_configs() -> None:
    global _registered
    if not _registered and MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def list_models() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@dataclass
class ClipModel:
    """A frozen open_clip CLIP with what is needed to feed it."""

    model: torch.nn.Module
    tokenizer: Callable
    preprocess_cfg: dict[str, Any]
    name: str
    pretrained: str | None

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return size if isinstance(size, int) else size[0]


class PretrainedUnavailable(RuntimeError):
    """Weights could not be had; the message says what to pass instead."""


def _is_random(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).lower() in ("", "none", "random")


def create_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """Build a CLIP model, frozen and in eval mode. See the module docstring for ``pretrained``."""
    models = list_models()
    if name not in models:
        raise ValueError(f"unknown model '{name}'. Known: open_clip's architectures and {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}")
    if _is_random(pretrained):
        pretrained = None
    elif os.path.isfile(str(pretrained)):
        pretrained = str(Path(pretrained).resolve())
    elif not Path(pretrained).is_absolute() and (REPO_ROOT / pretrained).is_file():
        pretrained = str(REPO_ROOT / pretrained)  # a path inside this repository, e.g. the default model
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise PretrainedUnavailable(
                f"'{pretrained}' is neither a local checkpoint file nor a pretrained tag of {name} "
                f"(tags: {tags or 'none'}). Pass a path to a .safetensors/.bin state dict, or 'none' for random weights.")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        if pretrained is not None and not os.path.isfile(pretrained):
            raise PretrainedUnavailable(
                f"could not fetch the '{pretrained}' weights of {name}: {err}. Without network access, download "
                f"the checkpoint on another machine and pass its local path as the pretrained source "
                f"(e.g. --pretrained /path/to/open_clip_model.safetensors).") from err
        raise
    model.eval().requires_grad_(False)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return ClipModel(model, open_clip.get_tokenizer(name), preprocess_cfg, name, pretrained)


_INTERPOLATION = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
}


def pixel_transform(preprocess_cfg: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor in [0, 1]. Mean/std normalisation is left to the model, so that
    attacks, eps and the served input all live in pixel space."""
    size = preprocess_cfg["size"]
    size = size if isinstance(size, int) else tuple(size)
    interpolation = _INTERPOLATION[preprocess_cfg.get("interpolation", "bicubic")]
    if preprocess_cfg.get("resize_mode", "shortest") == "squash":
        resize = [transforms.Resize((size, size) if isinstance(size, int) else size, interpolation=interpolation)]
    else:
        resize = [transforms.Resize(size, interpolation=interpolation), transforms.CenterCrop(size)]
    return transforms.Compose([transforms.Lambda(lambda im: im.convert("RGB")), *resize, transforms.ToTensor()])
