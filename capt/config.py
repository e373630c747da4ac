"""Run configuration: a YAML file naming a method (``capt/configs/methods/*.yaml``) whose prompt,
loss and attack sections the file may override key by key."""
from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .hardware import LEGACY_AMP, check_precision
from .losses import LossConfig
from .options import Options
from .prompts import PromptConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METHOD_DIR = CONFIG_DIR / "methods"


def list_methods() -> list[str]:
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


def parse_eps(value: Any) -> float:
    """``0.0039``, ``"1/255"`` or ``"2.67/255"`` -> float; refuses negatives and NaN."""
    try:
        if isinstance(value, str) and "/" in value:
            numerator, denominator = value.replace(" ", "").split("/")
            eps = float(numerator) / float(denominator)
        else:
            eps = float(value)
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"not a number or fraction: '{value}'") from err
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {value}")
    return eps


# ``alpha: "eps/1.5"``, ``"0.5*eps"``, ``"2*eps/3"`` or ``"eps"``: a step size relative to the attack's eps.
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RELATIVE_TO_EPS = re.compile(rf"^\s*(?:{_NUMBER}\s*\*\s*)?eps\s*(?:/\s*{_NUMBER})?\s*$")

# Default step size: ``steps * alpha = 2 * eps``. This is the method page's training attack (2 steps of
# eps at 1/255, 3 steps of eps/1.5 above; ``capt.replicate._attack_for``), and the least total travel of
# signed steps that reaches every point of the ball (2 eps wide per pixel) from any random start.
DEFAULT_TRAVEL_IN_EPS = 2.0


def parse_alpha(value: Any, eps: float) -> float:
    """A step size as ``parse_eps`` reads it, or relative to ``eps`` (``"eps/1.5"``, ``"0.5*eps"``)."""
    if isinstance(value, str) and "eps" in value:
        match = _RELATIVE_TO_EPS.match(value)
        if not match:
            raise ValueError(f"not a step size relative to eps (e.g. 'eps/1.5', '0.5*eps'): '{value}'")
        factor, divisor = (float(g) if g else 1.0 for g in match.groups())
        if divisor == 0:
            raise ValueError(f"not a step size relative to eps (division by zero): '{value}'")
        return parse_eps(factor / divisor * eps)
    return parse_eps(value)


@dataclass
class AttackConfig(Options):
    """PGD of the training loop. ``alpha`` left out (None) becomes ``2 * eps / steps`` (see
    ``DEFAULT_TRAVEL_IN_EPS``) and is stored resolved, so run records and the resume check hold the
    step size that was used; an explicit ``alpha`` (absolute or relative to eps) is kept."""
    SECTION = "attack"

    eps: float = 1 / 255
    alpha: float | None = None
    steps: int = 2
    loss: str = "ce"
    random_start: bool = True

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"attack steps must be >= 0, got {self.steps}")
        if self.alpha is None:
            # No steps, no attack: the step size is then never used.
            self.alpha = DEFAULT_TRAVEL_IN_EPS * self.eps / self.steps if self.steps else 0.0
        # Relative margin: eps / steps * steps may round just below eps.
        if self.steps and self.steps * self.alpha < self.eps * (1 - 1e-9):
            warnings.warn(f"attack: {self.steps} step(s) of {self.alpha:.4g} travel {self.steps * self.alpha:.4g} < "
                          f"eps {self.eps:.4g}: the attack cannot reach the edge of its ball (leave alpha out for "
                          f"{DEFAULT_TRAVEL_IN_EPS:g} * eps / steps)", UserWarning, stacklevel=2)

    @classmethod
    def _convert(cls, values: dict) -> dict:
        values = dict(values)
        if "eps" in values:
            values["eps"] = parse_eps(values["eps"])
        if values.get("alpha") is not None:
            values["alpha"] = parse_alpha(values["alpha"], values.get("eps", cls.eps))
        return values


def load_method(name: str) -> dict:
    path = METHOD_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown method '{name}'; known: {list_methods()}")
    return yaml.safe_load(path.read_text()) or {}


@dataclass
class CurveConfig(Options):
    """Learning-curve points in the epoch records (``metrics.jsonl``): every ``every`` epochs (0: none)
    and after the last, clean and PGD accuracy of the model being tuned on ``samples`` images of
    ``data`` (held out) and on as many of its own training images, at ``eps`` (default: the training
    attack's), with ``pgd_steps`` of step eps/4. Seeded, and outside the optimisation: a run with a
    curve ends with the same prompts as one without."""
    SECTION = "curve"

    every: int = 0
    data: str | None = None
    samples: int = 200
    eps: list | None = None
    pgd_steps: int = 10

    def __post_init__(self):
        if self.every < 0 or self.samples < 1 or self.pgd_steps < 1:
            raise ValueError("curve: every must be >= 0, samples and pgd_steps >= 1")
        if self.every and not self.data:
            raise ValueError("curve: give data (a dataset spec of held-out images, e.g. toyworld_pairs::test)")

    @classmethod
    def _convert(cls, values: dict) -> dict:
        values = dict(values)
        if values.get("eps") is not None:
            values["eps"] = [parse_eps(e) for e in values["eps"]]
        return values


@dataclass
class TrainConfig:
    model: str = "capt-tiny-vit"
    pretrained: str | None = None
    quick_gelu: bool | None = None  # None: what the pretrained tag (or the model name) says; see capt.models
    method: str = "capt"
    data: dict = field(default_factory=lambda: {"name": "imagefolder", "root": "data", "split": "train"})
    shots: int | None = 16
    seed: int = 1
    epochs: int = 5
    # Stop after this many optimiser steps (a dry run of a protocol); the learning-rate schedule still
    # follows ``epochs``. None: train all ``epochs``.
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    num_workers: int = 0
    # Recompute transformer blocks in the backward pass (PromptedCLIP.set_grad_checkpointing): far less
    # memory for a large label set's text tower, about a third more compute, the same result.
    grad_checkpointing: bool = False
    # auto | fp32 | bf16 | fp16 (capt.hardware): autocast of the training step, PGD included; auto times
    # capt.hardware.offered_precision against fp32 on one step (a distributed run takes
    # recommended_precision untimed). A legacy ``amp: true`` loads as
    # "cuda-bf16" (bf16 autocast on CUDA, fp32 on CPU: what it did), ``amp: false`` as fp32.
    precision: str = "auto"
    device: str = "auto"
    output_dir: str = "runs/capt"
    keep_checkpoints: int = 2
    # The frozen CLIP f_0 of the loss (its clean predictions and alpha); None: the tuned model with its
    # prompts off. Set it to the original weights when ``pretrained`` is a robust backbone (capt robustify).
    reference_pretrained: str | None = None
    curve: CurveConfig = field(default_factory=CurveConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = copy.deepcopy(values)
        method = load_method(values.get("method", cls.method))
        if not method.get("trainable", True):
            raise ValueError(f"method '{values.get('method')}' has nothing to train; evaluate it with "
                             "`capt eval --method zeroshot --model ... --pretrained ...`")
        nested = {}
        for section, kind in (("prompt", PromptConfig), ("loss", LossConfig), ("attack", AttackConfig),
                              ("curve", CurveConfig)):
            merged = {**(method.get(section) or {}), **(values.pop(section, None) or {})}
            nested[section] = kind.from_dict(merged)
        values = cls.upgrade_legacy(values)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config key(s): {sorted(unknown)}")
        config = cls(**values, **nested)
        check_precision(config.precision, allow_legacy=True)
        if config.epochs < 1 or config.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if config.max_steps is not None and config.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or left out for no limit), got {config.max_steps}")
        if config.shots is not None and config.shots < 1:
            config.shots = None  # 0 means all data
        return config

    @staticmethod
    def upgrade_legacy(values: dict) -> dict:
        """A config (or a run's config.yaml) written before ``precision`` existed: ``amp`` becomes it."""
        if "amp" not in values:
            return values
        values = dict(values)
        amp = values.pop("amp")
        legacy = LEGACY_AMP if amp else "fp32"
        if values.get("precision") not in (None, legacy):
            raise ValueError(f"config gives both amp: {amp} and precision: {values['precision']}; "
                             "amp is the old name, keep precision only")
        values["precision"] = legacy
        return values

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        if "precision" in overrides:
            values.pop("amp", None)  # --precision replaces the file's legacy amp
        values.update(overrides)
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return asdict(self)
