"""Model factory: a CLIP model, its preprocessing and tokenizer from a name and a pretrained source.

Names are open_clip architectures plus this project's JSON configs in ``models/`` (registered with
open_clip, the way open_clip keeps its own). The pretrained source is one of
- ``None`` / ``"none"``: random weights (tests, pretraining from scratch);
- a path to a local checkpoint (``.safetensors``, or a ``.pt``/``.bin`` state dict loaded with
  ``torch.load(weights_only=True)``, so nothing is unpickled);
- an open_clip pretrained tag such as ``"openai"`` (needs the network or a warm hub cache).

The activation is the one the weights were trained with. For a tag it comes from open_clip's
pretrained config (``"openai"`` weights are QuickGELU nets: ``ViT-B-32`` + ``openai`` builds
``ViT-B-32`` with QuickGELU, as ``ViT-B-32-quickgelu`` would). A local file cannot say: use a
``-quickgelu`` model name (``ViT-B-32-quickgelu``) or ``quick_gelu=True`` (``quick_gelu`` in a run
config, ``--quick-gelu`` on the command line) for OpenAI weights saved to disk. The choice is
recorded in checkpoints and bundles (``ClipModel.quick_gelu``).

:func:`save_clip_dir` / :func:`load_clip_dir` write and read open_clip's own ``local-dir:`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``): how a bundle carries its base model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from .images import pixel_transform  # noqa: F401 - the one image transform, re-exported beside the factory

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
    quick_gelu: bool = False
    model_cfg: dict[str, Any] = field(default_factory=dict)  # the architecture as open_clip builds it

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return size if isinstance(size, int) else size[0]


class PretrainedUnavailable(RuntimeError):
    """Weights could not be had; the message says what to pass instead."""


def _is_random(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).lower() in ("", "none", "random")


def tag_quick_gelu(name: str, tag: str) -> bool:
    """Whether open_clip's pretrained config says the ``tag`` weights of ``name`` are a QuickGELU net."""
    return bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    """What the built network actually runs (read off its first MLP, not off a config)."""
    from open_clip.transformer import QuickGELU
    return any(isinstance(m, QuickGELU) for m in model.modules())


def create_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                quick_gelu: bool | None = None) -> ClipModel:
    """Build a CLIP model, frozen and in eval mode. See the module docstring for ``pretrained`` and
    ``quick_gelu`` (None: the tag's choice, or the model name's for files and random weights)."""
    models = list_models()
    if name not in models:
        raise ValueError(f"unknown model '{name}'. Known: open_clip's architectures and {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}")
    model_cfg = open_clip.get_model_config(name)
    named_quick_gelu = bool(model_cfg.get("quick_gelu", False))
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
        trained_with = tag_quick_gelu(name, pretrained)
        if quick_gelu is not None and quick_gelu != trained_with:
            raise ValueError(f"quick_gelu={quick_gelu} contradicts the '{pretrained}' weights of {name}, which were "
                             f"trained with {'QuickGELU' if trained_with else 'GELU'}")
        quick_gelu = trained_with
    if quick_gelu is None:
        quick_gelu = named_quick_gelu
    if named_quick_gelu and not quick_gelu:
        raise ValueError(f"{name} is a QuickGELU architecture; quick_gelu=False contradicts it (use the name without -quickgelu)")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
    except RuntimeError as err:
        if pretrained is not None and not os.path.isfile(pretrained):
            raise PretrainedUnavailable(
                f"could not fetch the '{pretrained}' weights of {name}: {err}. Without network access, download "
                f"the checkpoint on another machine and pass its local path as the pretrained source "
                f"(e.g. --pretrained /path/to/open_clip_model.safetensors).") from err
        raise
    return _frozen(model, open_clip.get_tokenizer(name), name, pretrained, {**model_cfg, "quick_gelu": quick_gelu})


def _frozen(model, tokenizer, name, pretrained, model_cfg) -> ClipModel:
    model.eval().requires_grad_(False)
    quick_gelu = uses_quick_gelu(model)
    if quick_gelu != bool(model_cfg.get("quick_gelu", False)):  # open_clip ignored the request: never serve that
        raise RuntimeError(f"{name}: asked open_clip for quick_gelu={model_cfg.get('quick_gelu')}, got {quick_gelu}")
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return ClipModel(model, tokenizer, preprocess_cfg, name, pretrained, quick_gelu, model_cfg)


OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def save_clip_dir(clip: ClipModel, directory: str | Path) -> list[str]:
    """The base model in open_clip's ``local-dir:`` layout (architecture, preprocessing, fp32
    safetensors weights), whatever format its weights came in. Returns the file names written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in clip.preprocess_cfg.items()}
    (directory / OPEN_CLIP_CONFIG).write_text(json.dumps(
        {"model_cfg": clip.model_cfg, "preprocess_cfg": preprocess, "capt": {"name": clip.name, "pretrained": clip.pretrained}},
        indent=2))
    state = {k: v.detach().float().contiguous().cpu() for k, v in clip.model.state_dict().items()}
    save_file(state, directory / OPEN_CLIP_WEIGHTS)
    return [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]


def load_clip_dir(directory: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """A base model saved by :func:`save_clip_dir`, built by open_clip from that folder alone (no model
    registry, no hub): the architecture is the one recorded, not this machine's ``models/*.json``."""
    directory = Path(directory).resolve()
    config = json.loads((directory / OPEN_CLIP_CONFIG).read_text())
    source = f"local-dir:{directory}"
    model = open_clip.create_model(source, device=device)
    recorded = config.get("capt", {})
    return _frozen(model, open_clip.get_tokenizer(source), recorded.get("name", source), recorded.get("pretrained"),
                   config["model_cfg"])
