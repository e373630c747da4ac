"""Adversarial attacks, one per module, on the small base in ``base.py``. ``pgd.py`` is ours (training and
the protocol's PGD-100); the stronger evaluation attacks (APGD, FAB, Square, AutoAttack) wrap
torchattacks and are imported from their modules (``capt.attacks.autoattack`` holds their registry),
so that importing this package does not need torchattacks."""
from .base import Attack
from .pgd import PGD

__all__ = ["Attack", "PGD"]
