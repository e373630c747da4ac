"""The adversarial prompt-tuning trainer. Every method (APT, AdvVP, AdvMaPLe, FAP-like, CAPT) is a
configuration of this one loop: PGD adversarial examples, then the loss of ``capt.losses``.

Determinism: the data order of an epoch and the attack's random start of a step are seeded from
(seed, epoch, step, rank), and checkpoints hold the optimiser and schedule, so a run resumed from a
checkpoint ends with the same prompts as an uninterrupted one (on the same device).

Multi-GPU: launch with ``torchrun --nproc_per_node N -m capt.cli train ...``; each process takes
``batch_size`` images per step and DistributedDataParallel averages the prompt gradients.

A step encodes the label set's text once (with grad; the attack gets a detached copy), runs the
clean images through the graph only when the loss differentiates through them (CE on clean images),
and takes the frozen CLIP's clean predictions from features computed once per run. Running sums
stay on the device and are read back once per epoch (and at most once a second for the progress bar).
An epoch record's ``seconds`` covers its steps; the first epoch a process runs also covers that
one-off frozen-feature pass.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .attacks import PGD
from .checkpoint import LATEST_FILE, atomic_write_text, read_checkpoint, read_trainer_state, save_checkpoint
from .config import AttackConfig, TrainConfig
from .data import load_dataset
from .hardware import LEGACY_AMP, autocast_factory, offered_precision, resolve_precision, timed_precision
from .losses import capt_loss
from .models import create_clip, pixel_transform
from .prompts import PromptConfig, PromptedCLIP, ZeroShotClassifier

logger = logging.getLogger("capt.train")

# Keys that change no result: a run may resume with other values, and they do not name its folder.
_RESUME_FREE_KEYS = ("output_dir", "num_workers", "device", "keep_checkpoints", "curve", "grad_checkpointing")
# The progress bar's running figures cost a host sync each time: refreshed at most this often.
_POSTFIX_SECONDS = 1.0


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

    def sum(self, values: torch.Tensor) -> list[float]:
        """Element-wise sum over ranks, read back to the host (one sync)."""
        if self.enabled:
            dist.all_reduce(values)
        return values.tolist()

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (all of one shape), concatenated in rank order."""
        if not self.enabled:
            return rows
        gathered = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(gathered, rows.contiguous())
        return torch.cat(gathered)

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


class _TrainingStep(nn.Module):
    """The differentiable part of one optimisation step as one module call, so that
    DistributedDataParallel, which must run the forward that the backward goes through, wraps all
    of it. The label set's text is encoded once a step, with grad (text prompts change every step;
    without them the text features are constant and encoded once per run); the attack gets a
    detached copy. The clean images enter the graph only if ``clean_in_graph`` (the loss's CE is on
    them); otherwise their logits are a no-grad forward, for the clean accuracy and the KL attack's
    target (the loss's KL terms detach them anyway). Returns float32 (clean, adversarial) logits."""

    def __init__(self, model: PromptedCLIP, tokens: torch.Tensor, attack: AttackConfig, clean_in_graph: bool):
        super().__init__()
        self.model, self.tokens, self.attack, self.clean_in_graph = model, tokens, attack, clean_in_graph
        self._constant_text: torch.Tensor | None = None

    def _text_features(self) -> torch.Tensor:
        if self.model.text_prompted:
            return self.model.encode_text(self.tokens)
        if self._constant_text is None:
            with torch.no_grad():
                self._constant_text = self.model.encode_text(self.tokens)
        return self._constant_text

    def forward(self, images: torch.Tensor, labels: torch.Tensor, attack_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model, cfg = self.model, self.attack
        text = self._text_features()
        with torch.set_grad_enabled(self.clean_in_graph):
            clean_logits = model.logits(model.encode_image(images), text).float()
        # The KL attack's target is the model's own clean prediction: these very logits, so the
        # attack needs no clean forward of its own.
        target_probs = F.softmax(clean_logits.detach(), dim=-1) if cfg.loss == "kl" else None
        attack = PGD(ZeroShotClassifier(model, text), eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                     random_start=cfg.random_start, loss=cfg.loss, seed=attack_seed)
        adversarial = attack(images, labels, target_probs=target_probs)
        adv_logits = model.logits(model.encode_image(adversarial), text).float()
        return clean_logits, adv_logits


PRECISION_FILE = "precision.json"  # a timed auto's choice and why; config.yaml -> precision is what ran


def _timed_training_precision(model: PromptedCLIP, tokens: torch.Tensor, config: TrainConfig, data,
                              device: torch.device) -> tuple[str, str]:
    """``timed_precision`` of one training step (the attack included) on the first few training images;
    the gradients it leaves on the prompts are dropped."""
    count = min(config.batch_size, len(data), 8)
    images = torch.stack([data.dataset[i][0] for i in range(count)]).to(device)
    labels = torch.tensor([int(data.dataset[i][1]) for i in range(count)], device=device)
    step = _TrainingStep(model, tokens, config.attack, clean_in_graph=config.loss.ce_on == "clean")

    def run() -> None:
        clean, adversarial = step(images, labels, 0)
        (clean.sum() + adversarial.sum()).backward()

    try:
        return timed_precision(run, device)
    finally:
        model.zero_grad(set_to_none=True)


def _epoch_order(config: TrainConfig, epoch: int, size: int) -> list[int]:
    """The rows of the training set in the order ``epoch`` takes them (before ranks split them), seeded
    from (seed, epoch) alone so that a resumed run and a dry run's frozen-feature pass see the order
    an uninterrupted run does."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(config.seed * 10_007 + epoch)).tolist()


def _reached_max_steps(config: TrainConfig, global_step: int) -> bool:
    return config.max_steps is not None and global_step >= config.max_steps


def _rows_left_to_visit(config: TrainConfig, size: int, start_epoch: int, global_step: int,
                        distributed: _Distributed) -> list[int] | None:
    """The training rows that the steps left to a ``max_steps`` run read, when they all fall in the
    first epoch it runs (a dry run of a protocol: 2 steps read 64 of ImageNet 16-shot's 16,000 images,
    and the frozen pass then encodes only the batches that hold them); None (every row) otherwise: no ``max_steps``, steps reaching into a second epoch, or a
    distributed run (whose ranks split the feature pass by dataset position, not by the epoch's order)."""
    if config.max_steps is None or distributed.enabled:
        return None
    images_left = (config.max_steps - global_step) * config.batch_size
    if images_left >= size:
        return None
    return _epoch_order(config, start_epoch, size)[:images_left]


def _encode_frozen(model: PromptedCLIP, dataset, rows: list[int], config: TrainConfig, device: torch.device,
                   autocast) -> torch.Tensor:
    loader = DataLoader(Subset(dataset, rows), batch_size=config.batch_size, shuffle=False,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    with torch.no_grad(), autocast(), model.prompts_disabled():
        return torch.cat([model.encode_image(images.to(device, non_blocking=True)) for images, _ in loader])


def _frozen_image_features(model: PromptedCLIP, dataset, config: TrainConfig, device: torch.device,
                           distributed: _Distributed, autocast, rows: list[int] | None = None) -> torch.Tensor:
    """The frozen CLIP's (prompts off) features of every training image, row ``i`` for ``dataset[i]``.

    Once per run instead of every epoch, because an image's frozen features never change: the
    training images carry no random augmentation (``pixel_transform`` is a deterministic resize and
    centre crop; toy-world images are rendered from a seed fixed per index). The batches are fixed
    (dataset order), not the epoch's, so a resumed run gets the same features, bit for bit, as an
    uninterrupted one. Ranks split the images (the last ones wrap around so that every rank has as
    many) and exchange the features. Kept on the device: images x embedding width (ImageNet 16-shot
    on ViT-B/32: 16,000 x 512, 16 MB in bf16).

    ``rows`` (a run that is not distributed; see ``_rows_left_to_visit``): only the full pass's batches
    that hold those rows are computed, and the other rows are left zeros, for a run that never reads
    them; every row computed equals the full pass's, bit for bit."""
    if rows is not None:
        if distributed.enabled:
            raise ValueError("the frozen features of chosen rows are for a run that is not distributed")
        # The full pass's own batches (dataset order) that hold the rows: the same batches give the
        # same features, bit for bit, as a full pass (a batch of other rows may round differently).
        size = config.batch_size
        batches = sorted({row // size for row in rows})
        chosen = [i for b in batches for i in range(b * size, min((b + 1) * size, len(dataset)))]
        computed = _encode_frozen(model, dataset, chosen, config, device, autocast)
        features = computed.new_zeros((len(dataset), *computed.shape[1:]))
        features[torch.tensor(chosen, device=computed.device)] = computed
        return features
    per_rank = math.ceil(len(dataset) / distributed.world_size)
    mine = [(distributed.rank * per_rank + i) % len(dataset) for i in range(per_rank)]
    features = _encode_frozen(model, dataset, mine, config, device, autocast)
    return distributed.gather_rows(features)[: len(dataset)]


class _Curve:
    """The learning-curve points of ``CurveConfig``: the same seeded images and attacks every time."""

    def __init__(self, config: TrainConfig, train_data, train_eps: float, transform):
        self.config = config.curve
        self.eps = self.config.eps or [train_eps]
        self.sets = {"heldout": load_dataset(self.config.data, transform), "train": train_data}

    def point(self, model: PromptedCLIP) -> dict:
        from .evaluate import evaluate
        point = {}
        for name, data in self.sets.items():
            result = evaluate(model, data, self.eps, steps=self.config.pgd_steps, batch_size=100,
                              max_samples=self.config.samples, seed=0, progress=False)
            point[name] = {"dataset": result["dataset"], "n": result["n"], "clean_acc": result["clean_acc"],
                           "robust_acc": result["robust_acc"]}
        point["attack"] = f"PGD-{self.config.pgd_steps}"
        return point


def _reference_model(config: TrainConfig, model: PromptedCLIP, device: torch.device) -> PromptedCLIP:
    """The frozen CLIP ``f_0`` of the loss: the tuned model with its prompts off, or, with
    ``reference_pretrained``, another CLIP of the same architecture (the original CLIP when ``model``
    sits on a robust backbone from ``capt robustify``, so that the consistency term still points at it)."""
    if not config.loss.needs_frozen:
        return model
    if config.reference_pretrained:
        clip = create_clip(config.model, config.reference_pretrained, device=device, quick_gelu=config.quick_gelu)
    elif config.prompt.tune_image_tower:
        # A tuned image tower is not the frozen CLIP even with the prompts off: f_0 keeps its original weights.
        clip = copy.deepcopy(model.base_clip)
        clip.model.requires_grad_(False)
    else:
        return model
    return PromptedCLIP(clip, PromptConfig()).to(device).eval()


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUME_FREE_KEYS}


def train(config: TrainConfig, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool = True) -> Path:
    """Train prompts as ``config`` says; returns the run directory. ``stop_after_epoch`` ends the
    run early (as an interruption would) after that epoch's checkpoint; the schedule still follows
    ``config.epochs`` and ``resume=True`` continues it. ``config.max_steps`` ends the run after that
    many optimiser steps, mid-epoch if need be: that epoch's record (with its real ``step`` and
    ``images``) and checkpoint are written, and a resumed run that has reached it trains no further."""
    device = resolve_device(config.device)
    distributed = _Distributed(device)
    try:
        return _train(config, device, distributed, resume, stop_after_epoch, progress)
    finally:
        distributed.close()


def _train(config: TrainConfig, device: torch.device, distributed: _Distributed, resume: bool,
           stop_after_epoch: int | None, progress: bool) -> Path:
    run_dir = Path(config.output_dir)
    # The run records the precision it ran in (auto resolved on this device), so that a resume on a
    # machine where auto means something else is refused rather than silently changing the result.
    precision = resolve_precision(config.precision, device)
    record = {**config.to_dict(), "precision": precision}
    has_checkpoint = (run_dir / LATEST_FILE).is_file()
    if has_checkpoint and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another output_dir")
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    if resume:
        saved = TrainConfig.upgrade_legacy(yaml.safe_load((run_dir / "config.yaml").read_text()))
        # A key added after the run was written held its default then (what the code did before it existed).
        saved = {**{k: v for k, v in TrainConfig().to_dict().items() if k != "precision"}, **saved}
        saved["precision"] = resolve_precision(saved.get("precision", LEGACY_AMP), device)  # a legacy amp run
        if config.precision == "auto" and saved["precision"] in ("fp32", precision, offered_precision(device)):
            # auto chose this by timing when the run started (fp32 where the model gained nothing from
            # the machine's reduced precision): a resume is not timed again, it continues that choice.
            precision = saved["precision"]
            record["precision"] = precision
        if _comparable(saved) != _comparable(record):
            changed = sorted(k for k in {**_comparable(saved), **_comparable(record)} if saved.get(k) != record.get(k))
            raise ValueError(f"--resume with a different configuration ({', '.join(changed)}); "
                             "resuming must not change the result, start a new output_dir instead")

    torch.manual_seed(config.seed)  # prompt initialisation, identical on every rank
    clip = create_clip(config.model, config.pretrained, device=device, quick_gelu=config.quick_gelu)
    model = PromptedCLIP(clip, config.prompt).to(device).set_grad_checkpointing(config.grad_checkpointing)
    data = load_dataset(config.data, pixel_transform(clip.preprocess_cfg)).few_shot(config.shots, config.seed)
    if len(data) == 0:
        raise ValueError(f"dataset {config.data} is empty")
    tokens = model.tokenize(data.classnames).to(device)
    reference = _reference_model(config, model, device)
    with torch.no_grad(), reference.prompts_disabled():
        frozen_text = reference.encode_labels(data.classnames)  # the hand prompt of f_0

    params = list(model.prompt_parameters().values())
    precision_timing = None  # what a timed auto chose and why (the timing, what else used the CPUs)
    if (config.precision == "auto" and offered_precision(device) != "fp32" and not resume
            and not distributed.enabled):
        # The machine offers a reduced precision; whether it is faster for this model is measured (one
        # step's forward and backward, each way). Ranks of a distributed run keep the untimed rule:
        # timed apart, they could choose differently.
        precision, why = _timed_training_precision(model, tokens, config, data, device)
        record["precision"] = precision
        precision_timing = {"precision": precision, "why": why}
        logger.info("precision auto: %s", why)
        if progress and distributed.is_main:
            tqdm.write(f"precision auto: {why}")
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
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(record, sort_keys=False))
        if precision_timing is not None:
            atomic_write_text(run_dir / PRECISION_FILE, json.dumps(precision_timing, indent=2) + "\n")
        else:  # a fresh start in a folder an earlier, unfinished timed run left: its choice is not this run's
            (run_dir / PRECISION_FILE).unlink(missing_ok=True)

    loss_cfg, attack_cfg = config.loss, config.attack
    step = _TrainingStep(model, tokens, attack_cfg, clean_in_graph=loss_cfg.ce_on == "clean")
    forward = step
    if distributed.enabled:
        # DDP waits for a gradient of every parameter that requires one: a zero-size prompt tensor
        # (the deep text prompts at text_depth 1, as APT has) never gets one, and holds nothing to train.
        for param in params:
            if param.numel() == 0:
                param.requires_grad_(False)
        forward = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_factory(precision, device)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model.train()

    one_off_started = time.perf_counter()
    frozen_features = None
    if loss_cfg.needs_frozen and start_epoch < config.epochs and not _reached_max_steps(config, global_step):
        # A dry run (max_steps) on a large training set would spend most of its time in this pass:
        # it encodes only the batches that hold the rows its steps read. (``rows`` goes by position: tests wrap this
        # function as ``lambda model, *args``.)
        visited_rows = _rows_left_to_visit(config, len(data), start_epoch, global_step, distributed)
        frozen_features = _frozen_image_features(reference, data.dataset, config, device, distributed, autocast,
                                                 visited_rows)
    one_off_seconds = time.perf_counter() - one_off_started

    curve = _Curve(config, data, attack_cfg.eps, pixel_transform(clip.preprocess_cfg)) if config.curve.every else None
    for epoch in range(start_epoch, config.epochs):
        if _reached_max_steps(config, global_step):
            break  # a dry run's last step is done (in the epoch before, or before it was resumed)
        order = _epoch_order(config, epoch, len(data))
        order = (order * distributed.world_size)[: per_rank * distributed.world_size]  # equal shards, like DistributedSampler
        shard = order[distributed.rank::distributed.world_size]
        loader = DataLoader(Subset(data.dataset, shard), batch_size=config.batch_size, shuffle=False,
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
        positions = torch.tensor(shard, device=device)  # the batches' rows of frozen_features
        # Summed over the epoch's images on the device (float64, as the host's floats were):
        # loss, clean correct, adversarial correct; the loss's parts by name.
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        part_sums: dict[str, torch.Tensor] = {}
        images_seen, postfix_due = 0, 0.0
        started = time.perf_counter() - (one_off_seconds if epoch == start_epoch else 0.0)
        # A dry run (max_steps) may end mid-epoch: the bar shows the steps it will take.
        bar_steps = len(loader) if config.max_steps is None else min(len(loader), config.max_steps - global_step)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and distributed.is_main),
                   total=bar_steps, dynamic_ncols=True, leave=True)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            batch = labels.numel()
            with autocast():
                frozen_logits = None
                if frozen_features is not None:
                    with torch.no_grad():
                        rows = positions[images_seen:images_seen + batch]
                        frozen_logits = reference.logits(frozen_features[rows], frozen_text).float()  # fp32, as the step's
                clean_logits, adv_logits = forward(images, labels, config.seed * 1_000_003 + global_step * 997
                                                   + distributed.rank)
                loss, parts = capt_loss(loss_cfg, labels, clean_logits, adv_logits, frozen_logits)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1

            images_seen += batch
            sums += torch.stack([loss.detach().double() * batch, (clean_logits.argmax(-1) == labels).sum().double(),
                                 (adv_logits.argmax(-1) == labels).sum().double()])
            for key, value in parts.items():
                part_sums[key] = part_sums.get(key, 0.0) + value.double() * batch
            if not bar.disable and time.perf_counter() >= postfix_due:
                mean_loss, acc, adv_acc = (sums / images_seen).tolist()
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{acc:.3f}", adv_acc=f"{adv_acc:.3f}")
                postfix_due = time.perf_counter() + _POSTFIX_SECONDS
            if _reached_max_steps(config, global_step):
                break  # the epoch's record and checkpoint below cover the steps taken

        keys = sorted(part_sums)
        images_total = torch.tensor([images_seen], dtype=torch.float64, device=device)
        summed = distributed.sum(torch.cat([sums, images_total, *(part_sums[k].reshape(1) for k in keys)]))
        n = summed[3]
        record = {"epoch": epoch + 1, "step": global_step, "lr": scheduler.get_last_lr()[0],
                  "loss": summed[0] / n, "clean_acc": summed[1] / n, "adv_acc": summed[2] / n,
                  **{k: v / n for k, v in zip(keys, summed[4:]) if k != "loss"},
                  "images": int(n), "seconds": round(time.perf_counter() - started, 3),
                  "world_size": distributed.world_size,
                  "rank_param_max_diff": distributed.max_param_difference(params)}
        record["images_per_s"] = round(n / max(record["seconds"], 1e-9), 2)
        last_epoch = epoch + 1 == config.epochs or _reached_max_steps(config, global_step)
        if config.curve.every and ((epoch + 1) % config.curve.every == 0 or last_epoch):
            record["curve"] = curve.point(model)
            model.train()
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
