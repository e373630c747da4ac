"""Adversarial attacks, one per module, on the small base in ``base.py``."""
from .base import Attack
from .pgd import PGD

__all__ = ["Attack", "PGD"]
