"""Auto-PGD, untargeted on cross-entropy (APGD-CE) and targeted on the DLR loss (APGD-T), from Croce &
Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020, arXiv:2003.01690; torchattacks' implementation (``torchattacks.APGD``,
``torchattacks.APGDT``) under this package's contract (``_torchattacks.py``).

Threat model: L∞, radius ``eps`` in pixel units ([0, 1] images, normalisation inside the model).
``steps`` iterations (default 100, AutoAttack's standard), one restart, a random start on the ball's
surface, a step size that starts at ``2·eps`` and halves when the loss stops improving (checkpoints
at 22%, then every 3-6% of the iterations), momentum 0.75; projection onto the ball and [0, 1] after
every step; the best point found (the first that misclassifies) is returned.

APGD-T runs one targeted attack per target class, the ``n_target_classes`` most likely wrong
classes in turn (AutoAttack's standard: 9, capped here at ``n_classes - 1``), each only on the images
no earlier target fooled. Its DLR loss normalises by ``z_π1 − (z_π3 + z_π4)/2`` and so needs at least
4 classes (the reference implementation refuses fewer, fra31/auto-attack ``checks.check_n_classes``):
with fewer, :class:`AttackNotApplicable` is raised.
"""
from __future__ import annotations

from torch import nn

from ._torchattacks import STANDARD_TARGET_CLASSES, TargetedTorchattacksAttack, TorchattacksAttack, seeded, torchattacks

STANDARD_STEPS = 100
MIN_CLASSES_TARGETED_DLR = 4


class APGDCE(TorchattacksAttack):
    name = "apgd-ce"

    def __init__(self, model: nn.Module, eps: float, steps: int = STANDARD_STEPS, seed: int | None = 0):
        super().__init__(model, eps, seed)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)

    def build(self, model):
        return torchattacks().APGD(model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=1,
                                   seed=seeded(self.seed), loss="ce", rho=0.75)


class APGDT(TargetedTorchattacksAttack):
    name = "apgd-t"
    min_classes = MIN_CLASSES_TARGETED_DLR
    needs = f"(targeted DLR loss) at least {MIN_CLASSES_TARGETED_DLR} classes"

    def __init__(self, model: nn.Module, eps: float, n_classes: int, steps: int = STANDARD_STEPS,
                 n_target_classes: int = STANDARD_TARGET_CLASSES, seed: int | None = 0):
        super().__init__(model, eps, n_classes, steps, n_target_classes, seed)

    def build(self, model):
        attack = torchattacks().APGDT(model, norm="Linf", eps=self.eps, steps=self.steps, n_restarts=1,
                                      seed=seeded(self.seed), rho=0.75, n_classes=self.n_classes)
        attack.n_target_classes = self.n_target_classes
        return attack
