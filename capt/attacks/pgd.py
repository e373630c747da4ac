"""Projected Gradient Descent (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018, arXiv:1706.06083), with the TRADES KL objective as an option (Zhang et al.,
"Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019, arXiv:1901.08573).

Threat model: L∞, radius ``eps`` in pixel units ([0, 1] images), ``steps`` signed-gradient steps of
size ``alpha``, uniform random start in the ball (optional), projection onto the ball and onto
[0, 1] after every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Attack

LOSSES = ("ce", "kl")


class PGD(Attack):
    """``loss="ce"`` maximises cross-entropy on ``labels`` (or, ``targeted``, minimises it towards
    them). ``loss="kl"`` maximises ``KL(p(x) ‖ p(x_adv))`` where ``p(x)`` is the model's own clean
    prediction, unless ``target_probs`` are given; it needs no labels."""

    def __init__(self, model: nn.Module, eps: float, alpha: float | None = None, steps: int = 10,
                 random_start: bool = True, loss: str = "ce", targeted: bool = False, seed: int | None = None):
        super().__init__(model, eps, seed)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got '{loss}'")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if targeted and loss != "ce":
            raise ValueError("a targeted attack needs loss='ce'")
        self.alpha = float(eps / 4 if alpha is None else alpha)
        self.steps = int(steps)
        self.random_start = random_start
        self.loss = loss
        self.targeted = targeted

    def _objective(self, logits: torch.Tensor, labels, target_probs) -> torch.Tensor:
        if self.loss == "ce":
            loss = F.cross_entropy(logits.float(), labels)
            return -loss if self.targeted else loss
        return F.kl_div(F.log_softmax(logits.float(), dim=-1), target_probs, reduction="batchmean")

    def perturb(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                target_probs: torch.Tensor | None = None) -> torch.Tensor:
        images = images.detach()
        if self.eps == 0 or self.steps == 0:
            return images.clone()
        if self.loss == "ce" and labels is None:
            raise ValueError("PGD with loss='ce' needs labels")
        if self.loss == "kl" and target_probs is None:
            with torch.no_grad():
                target_probs = F.softmax(self.model(images).float(), dim=-1)
        return self._signed_ascent(images, lambda logits: self._objective(logits, labels, target_probs),
                                   self.steps, self.alpha, self.random_start)
