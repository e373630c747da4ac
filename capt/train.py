"""The adversarial prompt-tuning trainer. Every method (APT, AdvVP, AdvMaPLe, FAP-like, CAPT) is a
configuration of this one loop: PGD adversarial examples, then the loss of ``capt.losses``.

Determinism: the data order of an epoch and the attack's random start of a step are seeded from
(seed, epoch, step, rank), and checkpoints hold the optimiser and schedule, so a run resumed from a
checkpoint ends with the same prompts as an uninterrupted one (on the same device).

Multi-GPU: launch with ``torchrun --nproc_per_node N -m capt.cli train ...``; each process takes
``batch_size`` images per step and DistributedDataParallel averages the prompt gradients.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .attacks import PGD
from .checkpoint import LATEST_FILE, atomic_write_text, read_checkpoint, read_trainer_state, save_checkpoint
from .config import TrainConfig
from .data import load_dataset
from .losses import capt_loss
from .models import create_clip, pixel_transform
from .prompts import PromptedCLIP, ZeroShotClassifier

# Keys that may differ between a run and its resumption without changing the result.
_RESUME_FREE_KEYS = ("output_dir", "num_workers", "device", "keep_checkpoints")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def warmup_cosine(warmup_steps: int, total_steps: int, lr: float, warmup_lr: float):
    """Multiplier of ``lr``: constant ``warmup_lr`` during warm-up, then cosine from ``lr`` to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_lr / lr
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _Distributed:
    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def max_param_difference(self, params: list[torch.Tensor]) -> float:
        """Largest difference between any rank's prompts and rank 0's (DDP keeps it at 0)."""
        if not self.enabled:
            return 0.0
        flat = torch.cat([p.detach().float().flatten() for p in params])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        difference = (flat - reference).abs().max()
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)
        return difference.item()

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUME_FREE_KEYS}


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool = True) -> Path:
    """Train prompts as ``config`` says; returns the run directory. ``stop_after_epoch`` ends the
    run early (as an interruption would) after that epoch's checkpoint; the schedule still follows
    ``config.epochs`` and ``resume=True`` continues it."""
    device = resolve_device(config.device)
    distributed = _Distributed(device)
    try:
        return _train(config, device, distributed, resume, stop_after_epoch, progress)
    finally:
        distributed.close()


def _train(config: TrainConfig, device: torch.device, distributed: _Distributed, resume: bool,
           stop_after_epoch: int | None, progress: bool) -> Path:
    run_dir = Path(config.output_dir)
    has_checkpoint = (run_dir / LATEST_FILE).is_file()
    if has_checkpoint and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another output_dir")
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    if resume:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        if _comparable(saved) != _comparable(config.to_dict()):
            changed = sorted(k for k in _comparable(saved) if saved.get(k) != config.to_dict().get(k))
            raise ValueError(f"--resume with a different configuration ({', '.join(changed)}); "
                             "resuming must not change the result, start a new output_dir instead")

    torch.manual_seed(config.seed)  # prompt initialisation, identical on every rank
    clip = create_clip(config.model, config.pretrained, device=device)
    model = PromptedCLIP(clip, config.prompt).to(device)
    data = load_dataset(config.data, pixel_transform(clip.preprocess_cfg)).few_shot(config.shots, config.seed)
    if len(data) == 0:
        raise ValueError(f"dataset {config.data} is empty")
    tokens = model.tokenize(data.classnames).to(device)
    with torch.no_grad(), model.prompts_disabled():
        frozen_text = model.encode_labels(data.classnames)  # the hand prompt of f_0

    params = list(model.prompt_parameters().values())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    per_rank = math.ceil(len(data) / distributed.world_size)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch, config.lr, config.warmup_lr))

    start_epoch, global_step, history = 0, 0, []
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        meta, state = read_checkpoint(run_dir)
        # The checkpoint holds every epoch's record: metrics.jsonl is rebuilt from it, so a kill
        # between the checkpoint and the file (or during the file's write) loses no line.
        history = meta.get("history", [])
        if distributed.is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        model.load_prompt_state_dict({k: v.to(device) for k, v in state.items()})
        trainer_state = read_trainer_state(run_dir)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_epoch, global_step = trainer_state["epoch"], trainer_state["global_step"]
    elif distributed.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    forward = model
    if distributed.enabled:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (config.amp and device.type == "cuda") \
        else contextlib.nullcontext
    loss_cfg, attack_cfg = config.loss, config.attack
    model.train()

    for epoch in range(start_epoch, config.epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 10_007 + epoch)).tolist()
        order = (order * distributed.world_size)[: per_rank * distributed.world_size]  # equal shards, like DistributedSampler
        shard = order[distributed.rank::distributed.world_size]
        loader = DataLoader(Subset(data.dataset, shard), batch_size=config.batch_size, shuffle=False,
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
        totals = {"loss": 0.0, "clean_correct": 0.0, "adv_correct": 0.0, "n": 0.0}
        part_sums: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and distributed.is_main),
                   dynamic_ncols=True, leave=True)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                with torch.no_grad():
                    text = model.encode_text(tokens)
                    frozen_logits = None
                    if loss_cfg.needs_frozen:
                        with model.prompts_disabled():
                            frozen_logits = model.logits(model.encode_image(images), frozen_text)
                attack = PGD(ZeroShotClassifier(model, text), eps=attack_cfg.eps, alpha=attack_cfg.alpha,
                             steps=attack_cfg.steps, random_start=attack_cfg.random_start, loss=attack_cfg.loss,
                             seed=config.seed * 1_000_003 + global_step * 997 + distributed.rank)
                adversarial = attack(images, labels)
                logits = forward(torch.cat([images, adversarial]), tokens)
                clean_logits, adv_logits = logits.float().chunk(2)
                loss, parts = capt_loss(loss_cfg, labels, clean_logits, adv_logits, frozen_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1

            batch = labels.numel()
            totals["loss"] += loss.item() * batch
            totals["clean_correct"] += (clean_logits.argmax(-1) == labels).sum().item()
            totals["adv_correct"] += (adv_logits.argmax(-1) == labels).sum().item()
            totals["n"] += batch
            for key, value in parts.items():
                part_sums[key] = part_sums.get(key, 0.0) + value * batch
            bar.set_postfix(loss=f"{totals['loss'] / totals['n']:.3f}",
                            acc=f"{totals['clean_correct'] / totals['n']:.3f}",
                            adv_acc=f"{totals['adv_correct'] / totals['n']:.3f}")

        keys = sorted(part_sums)
        summed = distributed.sum([totals["loss"], totals["clean_correct"], totals["adv_correct"], totals["n"],
                                  *(part_sums[k] for k in keys)], device)
        n = summed[3]
        record = {"epoch": epoch + 1, "step": global_step, "lr": scheduler.get_last_lr()[0],
                  "loss": summed[0] / n, "clean_acc": summed[1] / n, "adv_acc": summed[2] / n,
                  **{k: v / n for k, v in zip(keys, summed[4:]) if k != "loss"},
                  "images": int(n), "seconds": round(time.perf_counter() - started, 3),
                  "world_size": distributed.world_size,
                  "rank_param_max_diff": distributed.max_param_difference(params)}
        record["images_per_s"] = round(n / max(record["seconds"], 1e-9), 2)
        history.append(record)
        if distributed.is_main:
            meta = {"method": config.method, "classnames": data.classnames, "dataset": data.name,
                    "attack": vars(attack_cfg), "loss": loss_cfg.to_dict(), "metrics": record, "history": history}
            trainer_state = {"epoch": epoch + 1, "global_step": global_step,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            save_checkpoint(run_dir, epoch + 1, model, meta, trainer_state, keep=config.keep_checkpoints)
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        distributed.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return run_dir
