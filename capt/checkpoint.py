"""Prompt checkpoints: ``prompts.safetensors`` + ``prompt_config.json`` (+ ``trainer_state.pt`` for
resuming), written as one directory that appears atomically; ``latest`` names the newest one.

Nothing here unpickles: prompts are safetensors, the trainer state is read with
``torch.load(weights_only=True)`` (tensors, numbers and dicts only).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .models import create_clip
from .prompts import PromptConfig, PromptedCLIP

FORMAT = "capt-prompts/1"
PROMPTS_FILE = "prompts.safetensors"
META_FILE = "prompt_config.json"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_checkpoint(run_dir: str | Path, epoch: int, model: PromptedCLIP, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``run_dir/epoch_NNN`` through a temporary directory, point ``latest`` at it, and keep
    the newest ``keep`` epochs. A crash at any point leaves the previous checkpoint intact."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{epoch:03d}"
    tmp = run_dir / f".{name}.tmp"
    for stale in [tmp, *run_dir.glob(".epoch_*.deleting")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    meta = {"format": FORMAT, "model": model.model_name, "pretrained": model.pretrained,
            "quick_gelu": model.quick_gelu, "prompt": model.config.to_dict(), "epoch": epoch, **meta}
    save_file({k: v.contiguous().cpu() for k, v in model.prompt_state_dict().items()}, tmp / PROMPTS_FILE,
              metadata={"format": FORMAT})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    for file in tmp.iterdir():
        _fsync(file)
    final = run_dir / name
    if final.exists():  # left by a run that crashed before pointing `latest` at it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(run_dir)
    atomic_write_text(run_dir / LATEST_FILE, name)
    epochs = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _EPOCH_DIR.match(p.name)))
    # Renamed before deletion: a kill mid-delete leaves a hidden folder (removed by the next save),
    # never a half-deleted epoch_NNN that looks like a checkpoint.
    for _, old in epochs[:-keep] if keep > 0 else []:
        doomed = run_dir / f".{old.name}.deleting"
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its ``latest`` checkpoint)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / LATEST_FILE).is_file():
        return path / (path / LATEST_FILE).read_text().strip()
    raise FileNotFoundError(f"no prompt checkpoint at {path} (expected {META_FILE} or a run directory with '{LATEST_FILE}')")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = resolve_checkpoint(path)
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META_FILE}: unsupported format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, load_file(path / PROMPTS_FILE)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(path) / STATE_FILE, map_location="cpu", weights_only=True)


def load_prompted_model(path: str | Path, pretrained: str | None = None, device: str | torch.device = "cpu") -> tuple[PromptedCLIP, dict]:
    """Rebuild the prompted model a checkpoint was trained with. ``pretrained`` overrides the
    recorded weights source (e.g. the same weights at another local path)."""
    meta, state = read_checkpoint(path)
    # Checkpoints from before the activation was recorded say nothing: the model name and tag decide.
    clip = create_clip(meta["model"], pretrained if pretrained is not None else meta["pretrained"], device=device,
                       quick_gelu=meta.get("quick_gelu"))
    model = PromptedCLIP(clip, PromptConfig.from_dict(meta["prompt"])).to(device)
    model.load_prompt_state_dict(state)
    return model.eval(), meta


# A whole-model training run's resumable state (``capt pretrain``, ``capt robustify``): one directory
# with the module's weights as safetensors and the optimiser, schedule and step, replaced atomically.
MODEL_STATE_FILE = "model.safetensors"


def save_training_state(state_dir: Path, module: torch.nn.Module, optimizer, scheduler, step: int) -> None:
    """Write ``state_dir`` through a temporary directory; a crash at any point leaves the previous one."""
    tmp = state_dir.with_name(f".{state_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, tmp / MODEL_STATE_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
               tmp / STATE_FILE)
    old = state_dir.with_name(f".{state_dir.name}.old")
    if state_dir.exists():
        os.rename(state_dir, old)
    os.rename(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(state_dir: Path, module: torch.nn.Module, optimizer, scheduler) -> int:
    """Restore what :func:`save_training_state` wrote into ``module``, ``optimizer`` and ``scheduler``
    (no unpickling: safetensors, and ``weights_only``); returns the step to continue from."""
    module.load_state_dict(load_file(state_dir / MODEL_STATE_FILE))
    state = torch.load(state_dir / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]
