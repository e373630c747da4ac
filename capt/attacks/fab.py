"""FAB, the Fast Adaptive Boundary attack, targeted version (FAB-T), from Croce & Hein, "Minimally
distorted Adversarial Examples with a Fast Adaptive Boundary Attack", ICML 2020, arXiv:1907.02044,
as AutoAttack runs it (arXiv:2003.01690); torchattacks' implementation (``torchattacks.FAB`` with
``multi_targeted=True``) under this package's contract (``_torchattacks.py``).

Threat model: L∞, radius ``eps`` in pixel units ([0, 1] images). FAB looks for the *smallest*
perturbation that reaches the decision boundary towards a target class (a linearisation of the
boundary, projection onto it, an extrapolation step ``alpha_max = 0.1``, ``eta = 1.05``,
``beta = 0.9``), ``steps`` iterations (default 100, AutoAttack's standard), one restart, for each of
the ``n_target_classes`` most likely wrong classes (9, capped at ``n_classes - 1``); a point counts
as adversarial only if its perturbation is within ``eps`` (otherwise the clean image is returned).
Needs at least 2 classes.
"""
from __future__ import annotations

from torch import nn

from ._torchattacks import STANDARD_TARGET_CLASSES, TargetedTorchattacksAttack, seeded, torchattacks

STANDARD_STEPS = 100


class FABT(TargetedTorchattacksAttack):
    name = "fab-t"

    def __init__(self, model: nn.Module, eps: float, n_classes: int, steps: int = STANDARD_STEPS,
                 n_target_classes: int = STANDARD_TARGET_CLASSES, seed: int | None = 0):
        super().__init__(model, eps, n_classes, steps, n_target_classes, seed)

    def build(self, model):
        attack = torchattacks().FAB(model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=1,
                                    alpha_max=0.1, eta=1.05, beta=0.9, seed=seeded(self.seed),
                                    multi_targeted=True, n_classes=self.n_classes)
        attack.n_target_classes = self.n_target_classes
        return attack
