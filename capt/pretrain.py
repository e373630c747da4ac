"""Contrastive CLIP pretraining (open_clip's ``ClipLoss``) of a small CLIP on the toy world and,
when present, Fashion-MNIST captioned from templates. This is how the embedded default model is
made; see ``capt pretrain --help`` and the README for the exact command.

Checkpoints (weights as safetensors, optimiser state read back with ``weights_only``) are written
atomically every ``checkpoint_every`` steps, and ``--resume`` continues a run.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from .checkpoint import atomic_write_text
from .data.fashion import FASHION_MNIST_CLASSNAMES, fashion_mnist_arrays
from .data.toyworld import caption_sample, held_out_pairs
from .models import create_clip


@dataclass
class PretrainConfig:
    model: str = "capt-toy-vit"
    steps: int = 1700
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    held_out_fraction: float = 0.2
    fashion_fraction: float = 0.1
    fashion_root: str | None = "/usr/share/datasets/fashion-mnist"
    checkpoint_every: int = 250


FASHION_CAPTIONS = ["a photo of a {}.", "a black and white photo of a {}.", "a {}.", "a picture of a {}.",
                    "a low resolution photo of a {}.", "a photo of the {}."]


class CaptionStream:
    """The ``i``-th (pixels, caption) of the pretraining corpus, a pure function of ``i`` and the seed."""

    def __init__(self, config: PretrainConfig, image_size: int):
        self.config, self.image_size = config, image_size
        self.held_out = held_out_pairs(config.held_out_fraction, seed=config.seed)
        self.fashion = None
        if config.fashion_fraction > 0 and config.fashion_root and os.path.isdir(config.fashion_root):
            self.fashion = fashion_mnist_arrays(config.fashion_root, "train")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        rng = random.Random(self.config.seed * 7_919 + index)
        if self.fashion is not None and rng.random() < self.config.fashion_fraction:
            images, labels = self.fashion
            i = rng.randrange(len(labels))
            from PIL import Image
            image = Image.fromarray(images[i]).convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            caption = rng.choice(FASHION_CAPTIONS).format(FASHION_MNIST_CLASSNAMES[labels[i]].lower())
            return to_tensor(image), caption
        image, caption = caption_sample(index, self.config.seed, self.held_out)
        if image.size[0] != self.image_size:
            image = image.resize((self.image_size, self.image_size))
        return to_tensor(image), caption


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_weights_fp16(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def pretrain(config: PretrainConfig, output_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    output_dir = Path(output_dir)
    state_dir = output_dir / "pretrain_state"
    if state_dir.exists() and not resume:
        raise FileExistsError(f"{output_dir} holds a pretraining run: pass --resume, or choose another output")
    torch.manual_seed(config.seed)
    clip = create_clip(config.model, None)
    model = clip.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    start = 0
    if resume and state_dir.exists():
        model.load_state_dict(load_file(state_dir / "model.safetensors"))
        state = torch.load(state_dir / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
    stream = CaptionStream(config, clip.image_size)
    mean = torch.tensor(clip.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clip.preprocess_cfg["std"]).view(1, 3, 1, 1)
    loss_fn = ClipLoss()
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "pretrain_metrics.jsonl"
    started = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="pretrain", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        batch = [stream[step * config.batch_size + j] for j in range(config.batch_size)]
        pixels = torch.stack([b[0] for b in batch])
        tokens = clip.tokenizer([b[1] for b in batch])
        image_features = model.encode_image((pixels - mean) / std, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_state(state_dir, model, optimizer, scheduler, done)
            with log.open("a") as f:
                f.write(json.dumps({"step": done, "loss": loss.item(), "logit_scale": model.logit_scale.exp().item(),
                                    "seconds": round(time.perf_counter() - started, 1)}) + "\n")
    weights = output_dir / "weights.safetensors"
    save_weights_fp16(model, weights)
    atomic_write_text(output_dir / "pretrain_config.json", json.dumps(asdict(config), indent=2))
    return weights


def _save_state(state_dir: Path, model, optimizer, scheduler, step: int) -> None:
    import shutil
    tmp = state_dir.with_name(f".{state_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
               tmp / "trainer_state.pt")
    old = state_dir.with_name(f".{state_dir.name}.old")
    if state_dir.exists():
        os.rename(state_dir, old)
    os.rename(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)
