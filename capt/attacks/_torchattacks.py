"""What every wrapper of a torchattacks attack (``apgd.py``, ``fab.py``, ``square.py``) shares.

torchattacks 3.5.1 (Kim, "Torchattacks: A PyTorch Repository for Adversarial Attacks",
arXiv:2010.01950) is the maintained implementation behind the evaluation attacks; this module adapts
it to this package's contract (``base.Attack``: L∞ in pixel units, images in [0, 1], the model's
parameters' ``.grad`` and train/eval mode left alone) where torchattacks does otherwise:

- its attacks reseed the *global* torch RNG (``torch.random.manual_seed(self.seed)``, cpu and cuda):
  run inside :func:`torch.random.fork_rng` so that an evaluation does not reset the caller's RNG;
- FAB calls ``.backward()``, which would accumulate into the prompt parameters' ``.grad``: the
  parameters are frozen (``requires_grad=False``) for the attack and restored after (also faster);
- its ``__call__`` puts the model in eval mode and back in train mode only if it was training: the
  mode of every submodule is restored as it was;
- the result is projected onto the threat model (ball and [0, 1]) again, so that no float rounding of
  the library can put a reported adversarial outside it.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .base import Attack
from .precision import require_fp32

INSTALL_HINT = ("pip install --no-deps torchattacks==3.5.1 scipy  "
                "(--no-deps: torchattacks pins requests~=2.25.1, which it never imports; `make install` does this)")


class TorchattacksMissing(ImportError, ValueError):
    """torchattacks (or scipy, which it imports) is not installed. Also a ValueError, so that the CLI
    prints it as a message with the install command rather than a traceback."""


class AttackNotApplicable(ValueError):
    """The attack is not defined for this label set (e.g. targeted DLR with fewer than 4 classes)."""


def torchattacks():
    """The torchattacks module, or a clear error saying how to install it."""
    try:
        import torchattacks as module
    except ImportError as err:  # also scipy missing: torchattacks imports it at import time
        raise TorchattacksMissing(f"the evaluation attacks APGD, FAB and Square need torchattacks ({err}): "
                                  f"{INSTALL_HINT}") from err
    return module


def _fork_rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


@contextlib.contextmanager
def _attack_context(model: nn.Module, device: torch.device):
    """Frozen parameters, modes restored, the caller's RNG state untouched."""
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=_fork_rng_devices(device)):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for module, training in modes:
            module.training = training


class TorchattacksAttack(Attack):
    """A torchattacks attack under this package's contract (see the module docstring).

    ``build(model)`` returns the configured torchattacks attack; it is built on first use, so that
    constructing the wrapper needs no torchattacks (the CLI can refuse bad arguments first)."""

    name = "torchattacks"

    def __init__(self, model: nn.Module, eps: float, seed: int | None = 0):
        super().__init__(model, eps, seed)
        self._attack = None

    def build(self, model: nn.Module):
        raise NotImplementedError

    def _library_attack(self):
        if self._attack is None:
            self._attack = self.build(self.model)
        return self._attack

    def perturb(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"{self.name} needs labels")
        images = images.detach()
        require_fp32(self.model, images)
        if self.eps == 0 or len(images) == 0:
            return images.clone()
        attack = self._library_attack()
        # torchattacks reads the device from the model's first parameter when it is built; follow the images.
        attack.set_device(images.device)
        with _attack_context(self.model, images.device):
            adversarial = attack(images, labels.detach())
        return self.project(adversarial.detach().to(images.dtype), images)


def seeded(seed: int | None) -> int:
    """torchattacks seeds with ``time.time()`` when given None: never let it (results must reproduce)."""
    return 0 if seed is None else int(seed)


# AutoAttack's standard number of target classes for its targeted attacks (APGD-T, FAB-T).
STANDARD_TARGET_CLASSES = 9


class TargetedTorchattacksAttack(TorchattacksAttack):
    """A targeted attack over the ``n_target_classes`` most likely wrong classes, capped at the
    ``n_classes - 1`` there are (torchattacks would target all of them: 999 on ImageNet)."""
    min_classes = 2
    needs = "at least 2 classes"

    def __init__(self, model: nn.Module, eps: float, n_classes: int, steps: int,
                 n_target_classes: int = STANDARD_TARGET_CLASSES, seed: int | None = 0):
        super().__init__(model, eps, seed)
        if n_classes < self.min_classes:
            raise AttackNotApplicable(f"{self.name} needs {self.needs}, this label set has {n_classes}")
        if steps < 1 or n_target_classes < 1:
            raise ValueError(f"steps and n_target_classes must be >= 1, got {steps} and {n_target_classes}")
        self.steps = int(steps)
        self.n_classes = int(n_classes)
        self.n_target_classes = min(int(n_target_classes), self.n_classes - 1)

