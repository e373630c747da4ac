"""``capt robustify``: unsupervised adversarial fine-tuning of a CLIP image tower (FARE; Schlarmann et
al., "Robust CLIP", ICML 2024, arXiv:2402.12336), a stage of its own before prompt tuning.

    min_theta  E_x [ max_{||z - x||_inf <= eps} ||phi_theta(z) - phi_0(x)||^2
                     + clean_weight * ||phi_theta(x) - phi_0(x)||^2 ]

``phi_0`` is the original, frozen image tower, ``phi_theta`` the one being tuned (every parameter of
the image tower; the text tower, and so every label set's class embeddings, stay as they were). The
embeddings are CLIP's L2-normalised ones: zero-shot classification reads only their direction. No
labels are used, so the tower stays a CLIP image encoder for any label set; the ``clean_weight``
term (ours; 0 is FARE) holds clean embeddings closer to the original, which is what clean zero-shot
accuracy depends on.

The output is a full CLIP state dict (``weights.safetensors``, fp16 like the default model's), so a
robust backbone is an ordinary ``pretrained:`` file for ``capt train``, ``capt eval`` and
``capt export``. Real robust CLIP backbones (FARE and TeCoA checkpoints of ViT-B-32 / ViT-L-14) load
the same way: convert them to an open_clip state dict and pass the file as ``--pretrained``.

Every ``eval_every`` steps the tuned tower's zero-shot clean and PGD accuracy on held-out images is
written to ``robustify_curve.jsonl`` (a learning curve against steps). State is checkpointed
atomically every ``checkpoint_every`` steps, and ``--resume`` continues to the same result.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from . import default_model
from .attacks.embedding import EmbeddingPGD, embedding_distance
from .checkpoint import atomic_write_text, load_training_state, save_training_state
from .config import parse_alpha, parse_eps
from .data import load_dataset
from .models import create_clip, pixel_transform
from .pretrain import save_weights_fp16
from .prompts import PromptConfig, PromptedCLIP

STATE_DIR, WEIGHTS_FILE = "robustify_state", "weights.safetensors"
CONFIG_FILE, METRICS_FILE, CURVE_FILE = "robustify_config.json", "robustify_metrics.jsonl", "robustify_curve.jsonl"


@dataclass
class RobustifyConfig:
    model: str = "capt-toy-vit"
    pretrained: str | None = field(default_factory=lambda: default_model.relative(default_model.WEIGHTS))
    quick_gelu: bool | None = None
    # Images only (labels are never read). By default the toy world's images of every pair, as pretraining
    # drew them: on the seen-pair train split alone the tower drifts on the pairs it never sees
    # (results/backbone-search/README.md).
    data: dict = field(default_factory=lambda: {"name": "toyworld_pairs", "split": "images"})
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    eps: float = 2 / 255
    attack_steps: int = 3
    attack_alpha: float | None = None  # None: 2 * eps / attack_steps, as the trainer's PGD
    clean_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 100  # 0: no learning curve
    eval_data: str = "toyworld_pairs::test"
    eval_samples: int = 200
    eval_eps: list = field(default_factory=lambda: [1 / 255, 2 / 255])
    eval_pgd_steps: int = 10

    def __post_init__(self):
        self.eps = parse_eps(self.eps)
        self.eval_eps = [parse_eps(e) for e in self.eval_eps]
        if self.attack_alpha is None:
            self.attack_alpha = 2 * self.eps / self.attack_steps if self.attack_steps else 0.0
        else:
            self.attack_alpha = parse_alpha(self.attack_alpha, self.eps)
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attack_steps < 0 or self.eval_every < 0 or self.clean_weight < 0:
            raise ValueError("attack_steps, eval_every and clean_weight must be >= 0")

    @classmethod
    def from_dict(cls, values: dict) -> "RobustifyConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown robustify config key(s): {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_factor(step: int, config: RobustifyConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _images(data, progress: bool) -> torch.Tensor:
    """Every training image, rendered once (the toy world renders on access)."""
    return torch.stack([data.dataset[i][0] for i in tqdm(range(len(data)), desc="images", disable=not progress,
                                                           dynamic_ncols=True, leave=False)])


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Step ``step``'s images: epochs of a seeded permutation, a pure function of the step (resumable)."""
    per_epoch = n // batch_size if n >= batch_size else 1
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def zero_shot_point(model: PromptedCLIP, config: RobustifyConfig, eval_data, step: int) -> dict:
    """Zero-shot clean and PGD accuracy of the current tower on the held-out images."""
    from .evaluate import evaluate
    result = evaluate(model, eval_data, config.eval_eps, steps=config.eval_pgd_steps, batch_size=100,
                      max_samples=config.eval_samples, seed=0, progress=False)
    return {"step": step, "dataset": result["dataset"], "n": result["n"], "clean_acc": result["clean_acc"],
            "robust_acc": result["robust_acc"], "attack": f"PGD-{config.eval_pgd_steps}"}


def robustify(config: RobustifyConfig, output_dir: str | Path, resume: bool = False, progress: bool = True,
              stop_after: int | None = None) -> Path:
    """Fine-tunes the image tower as the module docstring says; returns the weights file (None when
    ``stop_after`` ends the run early, as an interruption would, after that step's checkpoint)."""
    output_dir = Path(output_dir)
    state_dir = output_dir / STATE_DIR
    if state_dir.exists() and not resume:
        raise FileExistsError(f"{output_dir} holds a robustify run: pass --resume, or choose another output")
    if resume and not state_dir.exists():
        raise FileNotFoundError(f"--resume: no robustify state in {output_dir}")
    if resume:
        saved = json.loads((output_dir / CONFIG_FILE).read_text())
        if saved != json.loads(json.dumps(config.to_dict())):
            changed = sorted(k for k in saved if saved[k] != json.loads(json.dumps(config.to_dict())).get(k))
            raise ValueError(f"--resume with a different configuration ({', '.join(changed)}); start a new output")
    torch.manual_seed(config.seed)
    clip = create_clip(config.model, config.pretrained, quick_gelu=config.quick_gelu)
    model = PromptedCLIP(clip, PromptConfig())  # no prompts: encode_image is CLIP's own, pixels in [0, 1]
    transform = pixel_transform(clip.preprocess_cfg)
    images = _images(load_dataset(config.data, transform), progress)
    eval_data = load_dataset(config.eval_data, transform) if config.eval_every else None
    model.eval()
    with torch.no_grad():  # phi_0(x) of every image, before any step
        targets = torch.cat([model.encode_image(chunk) for chunk in images.split(256)])

    visual = model.clip.visual
    visual.requires_grad_(True)
    decayed = [p for n, p in visual.named_parameters() if p.ndim >= 2 and "ln" not in n]
    kept = [p for n, p in visual.named_parameters() if not (p.ndim >= 2 and "ln" not in n)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": config.weight_decay},
                                   {"params": kept, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    start = 0
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        start = load_training_state(state_dir, model.clip, optimizer, scheduler)
    else:
        atomic_write_text(output_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
        for name in (METRICS_FILE, CURVE_FILE):
            (output_dir / name).unlink(missing_ok=True)
        if eval_data is not None:
            _append(output_dir / CURVE_FILE, zero_shot_point(model, config, eval_data, 0))

    encoder = model.encode_image
    started, sums, count = time.perf_counter(), torch.zeros(3, dtype=torch.float64), 0
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="robustify", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        rows = _batch_indices(len(images), config.batch_size, step, config.seed)
        clean, target = images[rows], targets[rows]
        attack = EmbeddingPGD(encoder, config.eps, config.attack_alpha, config.attack_steps,
                              seed=config.seed * 1_000_003 + step)
        adversarial = attack(clean, targets=target)
        adv_distance = embedding_distance(encoder(adversarial), target)
        loss = adv_distance.mean()
        clean_distance = None
        if config.clean_weight > 0:
            clean_distance = embedding_distance(encoder(clean), target)
            loss = loss + config.clean_weight * clean_distance.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += torch.tensor([loss.item(), adv_distance.mean().item(),
                              clean_distance.mean().item() if clean_distance is not None else float("nan")],
                             dtype=torch.float64)
        count += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            model.eval()
            save_training_state(state_dir, model.clip, optimizer, scheduler, done)
            mean = (sums / count).tolist()
            _append(output_dir / METRICS_FILE, {"step": done, "loss": mean[0], "adv_distance": mean[1],
                                                "clean_distance": None if math.isnan(mean[2]) else mean[2],
                                                "lr": scheduler.get_last_lr()[0],
                                                "seconds": round(time.perf_counter() - started, 1)})
            sums, count = torch.zeros(3, dtype=torch.float64), 0
        if eval_data is not None and (done % config.eval_every == 0 or done == config.steps):
            _append(output_dir / CURVE_FILE, zero_shot_point(model, config, eval_data, done))
        if stop_after is not None and done >= stop_after:
            if done % config.checkpoint_every and done != config.steps:
                save_training_state(state_dir, model.clip, optimizer, scheduler, done)
            return None
    weights = output_dir / WEIGHTS_FILE
    save_weights_fp16(model.clip, weights)
    return weights


def _append(path: Path, record: dict) -> None:
    """A line more, written atomically with the lines before it (a kill leaves the file whole)."""
    lines = path.read_text() if path.is_file() else ""
    atomic_write_text(path, lines + json.dumps(record) + "\n")


def _run(args) -> None:
    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: expected a mapping at the top level")
    overrides = {"model": args.model, "pretrained": args.pretrained, "steps": args.steps, "batch_size": args.batch_size,
                 "lr": args.lr, "eps": args.eps, "attack_steps": args.attack_steps, "clean_weight": args.clean_weight,
                 "seed": args.seed, "eval_every": args.eval_every}
    values.update({k: v for k, v in overrides.items() if v is not None})
    weights = robustify(RobustifyConfig.from_dict(values), args.output, resume=args.resume, progress=not args.no_progress)
    print(f"robust image tower in {weights} (use it as --pretrained / pretrained:)")


def register(subparsers) -> tuple[type[BaseException], ...]:
    """Adds ``robustify`` to the ``capt`` sub-commands (entry point of the ``capt.commands`` group)."""
    p = subparsers.add_parser("robustify", help="FARE: unsupervised adversarial fine-tuning of the image tower")
    p.add_argument("--output", required=True, help="folder for weights.safetensors, metrics, curve and resumable state")
    p.add_argument("--config", help="YAML with RobustifyConfig keys (flags override it)")
    p.add_argument("--model")
    p.add_argument("--pretrained", help="the CLIP to robustify (default: the embedded default model's weights)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eps", help="L∞ radius, e.g. 2/255")
    p.add_argument("--attack-steps", type=int)
    p.add_argument("--clean-weight", type=float, help="weight of the clean-embedding term (0: FARE as published)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="steps between learning-curve points (0: none)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run)
    return ()
