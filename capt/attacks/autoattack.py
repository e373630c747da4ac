"""AutoAttack, the standard L∞ sequence of Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020, arXiv:2003.01690, and the registry of
evaluation attacks (``EVAL_ATTACKS``) that ``capt eval --attack`` and ``capt replicate`` choose from.

Threat model of every attack here: L∞, radius ``eps`` in pixel units ([0, 1] images, normalisation
inside the model), untargeted success (the prediction differs from the label).

AutoAttack runs APGD-CE (``apgd.py``), APGD-T (``apgd.py``), FAB-T (``fab.py``) and Square
(``square.py``) in this order, each only on the images that every earlier one left correctly
classified, and keeps for each image the first adversarial that fools it: the worst case per image
over the four. Budgets are the reference's "standard" version (fra31/auto-attack): 100 iterations
for APGD and FAB, 9 target classes for APGD-T and FAB-T (capped at ``n_classes - 1``), 5000 Square
queries, one restart each, one seed for all. torchattacks' own ``AutoAttack`` is not used for the
reported figures: it builds APGD, APGD-T and FAB with torchattacks' default of 10 iterations (not
100) and targets all ``n_classes - 1`` wrong classes (not 9), and it returns only the final images,
not which stage fooled each one, which the gradient-masking check needs. Its components and its
"only the still-correct points" rule (``torchattacks.MultiAttack``) are what this sequence uses.

With fewer than 4 classes APGD-T is not defined (targeted DLR loss) and is left out of the sequence;
``skipped`` says so and the results record it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ._torchattacks import AttackNotApplicable, torchattacks
from .apgd import APGDCE, APGDT
from .apgd import STANDARD_STEPS as APGD_STEPS
from .apgd import STANDARD_TARGET_CLASSES
from .base import Attack
from .fab import FABT
from .fab import STANDARD_STEPS as FAB_STEPS
from .pgd import PGD
from .square import STANDARD_QUERIES, Square


@dataclass(frozen=True)
class AttackBudget:
    """How much each evaluation attack may spend. The defaults are the evaluation protocol: PGD-100
    with step eps/4 (the method page) and AutoAttack's standard budgets."""
    pgd_steps: int = 100
    apgd_steps: int = APGD_STEPS
    fab_steps: int = FAB_STEPS
    square_queries: int = STANDARD_QUERIES
    n_target_classes: int = STANDARD_TARGET_CLASSES

    def to_dict(self) -> dict:
        return asdict(self)


STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
# Which attacks read the model's gradient: the masking check compares these with the black-box ones.
WHITE_BOX = ("pgd", "apgd-ce", "apgd-t", "fab-t")
BLACK_BOX = ("square",)


def _pgd(classifier, eps, *, n_classes, seed, budget):
    # The protocol's PGD (capt/attacks/pgd.py): step eps/4, uniform random start, cross-entropy.
    return PGD(classifier, eps=eps, alpha=eps / 4, steps=budget.pgd_steps, random_start=True, loss="ce", seed=seed)


def _apgd_ce(classifier, eps, *, n_classes, seed, budget):
    return APGDCE(classifier, eps, steps=budget.apgd_steps, seed=seed)


def _apgd_t(classifier, eps, *, n_classes, seed, budget):
    return APGDT(classifier, eps, n_classes, steps=budget.apgd_steps, n_target_classes=budget.n_target_classes,
                 seed=seed)


def _fab_t(classifier, eps, *, n_classes, seed, budget):
    return FABT(classifier, eps, n_classes, steps=budget.fab_steps, n_target_classes=budget.n_target_classes, seed=seed)


def _square(classifier, eps, *, n_classes, seed, budget):
    return Square(classifier, eps, queries=budget.square_queries, seed=seed)


_STAGE_FACTORIES = {"apgd-ce": _apgd_ce, "apgd-t": _apgd_t, "fab-t": _fab_t, "square": _square}


class AutoAttack:
    """The standard sequence (module docstring). ``run`` returns the adversarial images and, per stage,
    which images that stage fooled (False where an earlier stage had already fooled the image, or the
    image was misclassified to begin with, since the stage did not run there)."""

    def __init__(self, model: nn.Module, eps: float, n_classes: int, seed: int | None = 0,
                 budget: AttackBudget = AttackBudget(),
                 on_stage: Callable[[str], None] | None = None):
        self.model = model
        self.eps = float(eps)
        self.on_stage = on_stage
        self.stages: list[tuple[str, Attack]] = []
        self.skipped: dict[str, str] = {}
        for name in STAGES:
            try:
                self.stages.append((name, _STAGE_FACTORIES[name](model, eps, n_classes=n_classes, seed=seed,
                                                                 budget=budget)))
            except AttackNotApplicable as err:
                self.skipped[name] = str(err)

    @torch.no_grad()
    def _correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(images).argmax(-1) == labels

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = images.detach(), labels.detach()
        adversarial = images.clone()
        robust = self._correct(images, labels)
        fooled = {}
        for name, attack in self.stages:
            if self.on_stage is not None:
                self.on_stage(name)
            mask = torch.zeros_like(robust)
            todo = robust.nonzero().flatten()
            if todo.numel():
                candidate = attack(images[todo], labels[todo])
                hit = ~self._correct(candidate, labels[todo])
                adversarial[todo[hit]] = candidate[hit]
                mask[todo[hit]] = True
                robust[todo[hit]] = False
            fooled[name] = mask
        return adversarial, fooled

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.run(images, labels)[0]


def _autoattack(classifier, eps, *, n_classes, seed, budget, on_stage=None):
    return AutoAttack(classifier, eps, n_classes, seed=seed, budget=budget, on_stage=on_stage)


# name -> factory(classifier, eps, *, n_classes, seed, budget) -> callable(images, labels) -> adversarial images.
# A factory raises AttackNotApplicable where the attack is not defined for the label set.
EVAL_ATTACKS: dict[str, Callable] = {
    "pgd": _pgd,
    "apgd-ce": _apgd_ce,
    "apgd-t": _apgd_t,
    "fab-t": _fab_t,
    "square": _square,
    "autoattack": _autoattack,
}

# How a results table names them.
ATTACK_TITLES = {"pgd": "PGD-{pgd_steps}", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T",
                 "square": "Square-{square_queries}", "autoattack": "AutoAttack"}


def attack_title(name: str, budget: AttackBudget | dict) -> str:
    values = budget.to_dict() if isinstance(budget, AttackBudget) else dict(budget)
    return ATTACK_TITLES.get(name, name).format(**{**AttackBudget().to_dict(), **values})


def require_backend(names) -> None:
    """Raise :class:`TorchattacksMissing` (with the install command) if one of the attacks needs torchattacks
    and it is not installed; ``pgd`` is ours and needs nothing."""
    if any(name != "pgd" for name in names):
        torchattacks()


def check_attack_names(names) -> list[str]:
    """The names, deduplicated in order; a ValueError naming the choices for an unknown one."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in EVAL_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {', '.join(map(repr, unknown))}: choose from {', '.join(EVAL_ATTACKS)}")
    if not names:
        raise ValueError(f"no attack given: choose from {', '.join(EVAL_ATTACKS)}")
    return names
