"""Run configuration: a YAML file naming a method (``capt/configs/methods/*.yaml``) whose prompt,
loss and attack sections the file may override key by key."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

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


@dataclass
class AttackConfig(Options):
    SECTION = "attack"

    eps: float = 1 / 255
    alpha: float = 1 / 255
    steps: int = 2
    loss: str = "ce"
    random_start: bool = True

    @classmethod
    def _convert(cls, values: dict) -> dict:
        return {k: parse_eps(v) if k in ("eps", "alpha") else v for k, v in values.items()}


def load_method(name: str) -> dict:
    path = METHOD_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown method '{name}'; known: {list_methods()}")
    return yaml.safe_load(path.read_text()) or {}


@dataclass
class TrainConfig:
    model: str = "capt-tiny-vit"
    pretrained: str | None = None
    method: str = "capt"
    data: dict = field(default_factory=lambda: {"name": "imagefolder", "root": "data", "split": "train"})
    shots: int | None = 16
    seed: int = 1
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    num_workers: int = 0
    amp: bool = True
    device: str = "auto"
    output_dir: str = "runs/capt"
    keep_checkpoints: int = 2
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
        for section, kind in (("prompt", PromptConfig), ("loss", LossConfig), ("attack", AttackConfig)):
            merged = {**(method.get(section) or {}), **(values.pop(section, None) or {})}
            nested[section] = kind.from_dict(merged)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config key(s): {sorted(unknown)}")
        config = cls(**values, **nested)
        if config.epochs < 1 or config.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if config.shots is not None and config.shots < 1:
            config.shots = None  # 0 means all data
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return asdict(self)
