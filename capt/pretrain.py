"""Contrastive CLIP pretraining of a small CLIP on the toy world and, when present, Fashion-MNIST
captioned from templates. This is how the embedded default model is made; see ``capt pretrain --help``
and the README for the exact command.

The loss is CLIP's symmetric InfoNCE with one change, ``loss="multi_positive"`` (the default): a
caption counts as a positive for every image in the batch it is true of, not only for its own image
(the generator knows what each caption asserts and what each image shows). With a small vocabulary of
captions, a batch of 128 holds several images of "a star"; plain CLIP (``loss="clip"``, open_clip's
``ClipLoss``) pushes them apart as negatives, which is label noise exactly where shapes are learnt.
This is the image-text-label contrastive loss of UniCL (Yang et al., CVPR 2022); with one positive per
row it is open_clip's loss.

Checkpoints (``capt.checkpoint.save_training_state``: weights as safetensors, optimiser state read back with ``weights_only``) are written
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
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from .checkpoint import atomic_write_text, load_training_state, save_training_state
from .data.fashion import FASHION_MNIST_CLASSNAMES, fashion_mnist_arrays
from .data.toyworld import caption_sample, held_out_pairs
from .hardware import autocast_factory, check_precision, offered_precision, resolve_precision, timed_precision
from .models import create_clip


@dataclass
class PretrainConfig:
    model: str = "capt-toy-vit"
    steps: int = 850
    batch_size: int = 128
    loss: str = "multi_positive"
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    held_out_fraction: float = 0.2
    draw_held_out: bool = True  # False: held-out pairs are never drawn either, not only never captioned
    fashion_fraction: float = 0.1
    fashion_root: str | None = "/usr/share/datasets/fashion-mnist"
    checkpoint_every: int = 250
    data_workers: int = 1  # processes that render the next batches while this one trains
    # auto | fp32 | bf16 | fp16: autocast of the step (capt.hardware); auto times bf16 against fp32 on one
    # step where the CPU has native bf16 and takes it at MIN_PRECISION_GAIN, fp32 elsewhere. The committed
    # default model was pretrained in fp32.
    precision: str = "auto"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got '{self.loss}'")
        check_precision(self.precision)


LOSSES = ("multi_positive", "clip")


FASHION_CAPTIONS = ["a photo of a {}.", "a black and white photo of a {}.", "a {}.", "a picture of a {}.",
                    "a low resolution photo of a {}.", "a photo of the {}."]


class CaptionStream:
    """The ``i``-th (pixels, caption, facts of the image, claims of the caption) of the pretraining
    corpus, a pure function of ``i`` and the seed. A caption is true of an image whose facts include
    its claims."""

    def __init__(self, config: PretrainConfig, image_size: int):
        self.config, self.image_size = config, image_size
        self.held_out = held_out_pairs(config.held_out_fraction)  # the evaluation split's, whatever the seed
        self.fashion = None
        if config.fashion_fraction > 0 and config.fashion_root and os.path.isdir(config.fashion_root):
            self.fashion = fashion_mnist_arrays(config.fashion_root, "train")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, frozenset, frozenset]:
        rng = random.Random(self.config.seed * 7_919 + index)
        if self.fashion is not None and rng.random() < self.config.fashion_fraction:
            images, labels = self.fashion
            i = rng.randrange(len(labels))
            from PIL import Image
            image = Image.fromarray(images[i]).convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            caption = rng.choice(FASHION_CAPTIONS).format(FASHION_MNIST_CLASSNAMES[labels[i]].lower())
            facts = frozenset({("fashion", int(labels[i]))})
            return to_tensor(image), caption, facts, facts
        image, caption, facts = caption_sample(index, self.config.seed, self.held_out, self.config.draw_held_out)
        if image.size[0] != self.image_size:
            image = image.resize((self.image_size, self.image_size))
        return to_tensor(image), caption.text, facts, caption.claims


class PretrainBatches(Dataset):
    """Step ``first_step + k``'s batch: pixels in [0, 1], tokens and the caption truth matrix."""

    def __init__(self, stream: CaptionStream, tokenizer, batch_size: int, first_step: int, last_step: int):
        self.stream, self.tokenizer, self.batch_size = stream, tokenizer, batch_size
        self.first_step, self.last_step = first_step, last_step

    def __len__(self) -> int:
        return self.last_step - self.first_step

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start = (self.first_step + k) * self.batch_size
        samples = [self.stream[start + j] for j in range(self.batch_size)]
        return (torch.stack([s[0] for s in samples]), self.tokenizer([s[1] for s in samples]),
                caption_truth([s[2] for s in samples], [s[3] for s in samples]))


def caption_truth(facts: list[frozenset], claims: list[frozenset]) -> torch.Tensor:
    """``truth[i, j]``: caption ``j`` is true of image ``i``."""
    return torch.tensor([[claim <= fact for claim in claims] for fact in facts], dtype=torch.bool)


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                             truth: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP's logits against targets spread evenly over the true pairs:
    each image over the captions true of it, each caption over the images it is true of."""
    logits_per_image = logit_scale * image_features @ text_features.T
    truth = truth.to(logits_per_image.dtype)
    image_targets = truth / truth.sum(1, keepdim=True)
    text_targets = truth.T / truth.T.sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_image, image_targets) + F.cross_entropy(logits_per_image.T, text_targets)) / 2


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
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98),
                                  eps=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    start = 0
    if resume and state_dir.exists():
        start = load_training_state(state_dir, model, optimizer, scheduler)
    batches = PretrainBatches(CaptionStream(config, clip.image_size), clip.tokenizer, config.batch_size, start,
                              config.steps)
    loader = DataLoader(batches, batch_size=None, num_workers=config.data_workers,
                        prefetch_factor=4 if config.data_workers else None)
    mean = torch.tensor(clip.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clip.preprocess_cfg["std"]).view(1, 3, 1, 1)
    clip_loss = ClipLoss()
    output_dir.mkdir(parents=True, exist_ok=True)
    precision = _pretrain_precision(config, model, clip, output_dir, resumed=start > 0, mean=mean, std=std)
    autocast = autocast_factory(precision, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    log = output_dir / "pretrain_metrics.jsonl"
    if start == 0:
        log.unlink(missing_ok=True)  # a rebuild into the folder of a finished run starts a new log
    started = time.perf_counter()
    bar = tqdm(zip(range(start, config.steps), loader), initial=start, total=config.steps, desc="pretrain",
               disable=not progress, dynamic_ncols=True)
    for step, (pixels, tokens, truth) in bar:
        with autocast():
            image_features = model.encode_image((pixels - mean) / std, normalize=True).float()
            text_features = model.encode_text(tokens, normalize=True).float()
        # The loss in fp32: its softmax over the batch is where reduced precision would hurt.
        if config.loss == "clip":
            loss = clip_loss(image_features, text_features, model.logit_scale.exp())
        else:
            loss = multi_positive_clip_loss(image_features, text_features, model.logit_scale.exp(), truth)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_training_state(state_dir, model, optimizer, scheduler, done)
            with log.open("a") as f:
                f.write(json.dumps({"step": done, "loss": loss.item(), "logit_scale": model.logit_scale.exp().item(),
                                    "seconds": round(time.perf_counter() - started, 1)}) + "\n")
    weights = output_dir / "weights.safetensors"
    save_weights_fp16(model, weights)
    atomic_write_text(output_dir / "pretrain_config.json",
                      json.dumps({**asdict(config), "precision_used": precision}, indent=2))
    return weights


PRECISION_FILE = "pretrain_precision.json"


def _pretrain_precision(config: PretrainConfig, model: torch.nn.Module, clip, output_dir: Path, resumed: bool,
                        mean: torch.Tensor, std: torch.Tensor) -> str:
    """The concrete precision of the run (pretraining runs on the CPU). ``auto`` where the machine offers
    a reduced precision is timed on one step of this model (``timed_precision``); the choice is kept in
    ``pretrain_precision.json`` so that a resumed run continues in it rather than timing again."""
    precision = resolve_precision(config.precision, "cpu")
    if config.precision != "auto":
        return precision
    chosen = output_dir / PRECISION_FILE
    if resumed:
        # Continue what the run began in, on whatever machine it resumes (bf16 runs on any CPU, if slowly);
        # a run without the record began before auto was timed: the rule.
        return json.loads(chosen.read_text())["precision"] if chosen.is_file() else precision
    if offered_precision("cpu") == "fp32":
        return precision
    count = config.batch_size  # the step as it runs: bf16's gain depends on the size of the matrices
    size = clip.image_size
    tokens = clip.tokenizer(["a photo of a red circle"] * count)
    loss = ClipLoss()

    def step() -> None:
        pixels = torch.rand(count, 3, size, size)
        image_features = model.encode_image((pixels - mean) / std, normalize=True).float()
        text_features = model.encode_text(tokens, normalize=True).float()
        loss(image_features, text_features, model.logit_scale.exp()).backward()

    try:
        precision, why = timed_precision(step, "cpu")
    finally:
        model.zero_grad(set_to_none=True)
    atomic_write_text(chosen, json.dumps({"precision": precision, "why": why}, indent=2) + "\n")
    return precision


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """As open_clip's training script: no weight decay on gains, biases and the temperature (decaying
    ``logit_scale`` pulls it towards 1 and flattens the logits)."""
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (kept if exempt else decayed).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
