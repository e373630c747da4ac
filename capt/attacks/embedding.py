"""PGD on an image encoder's embedding: the inner maximisation of FARE (Schlarmann, Singh, Croce and
Hein, "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust Large
Vision-Language Models", ICML 2024, arXiv:2402.12336).

    x_adv = argmax_{||z - x||_inf <= eps}  ||phi(z) - target||_2^2

``target`` is the embedding the image should keep (FARE: the original, frozen encoder's embedding of
the clean image). No labels and no label set: the attack moves the embedding itself, which is what
every zero-shot classifier built on it reads.

Threat model: L∞, radius ``eps`` in pixel units ([0, 1] images), ``steps`` signed-gradient steps of
size ``alpha``, uniform random start in the ball (optional), projection onto the ball and onto
[0, 1] after every step (as :class:`capt.attacks.pgd.PGD`).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Attack


def embedding_distance(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance per row (float32)."""
    return (embeddings.float() - targets.float()).pow(2).sum(-1)


class EmbeddingPGD(Attack):
    """``model`` maps pixels ``[N, 3, H, W]`` to embeddings ``[N, D]``; the attack maximises the mean
    squared distance of the embeddings from ``targets``."""

    def __init__(self, model: nn.Module, eps: float, alpha: float | None = None, steps: int = 10,
                 random_start: bool = True, seed: int | None = None):
        super().__init__(model, eps, seed)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.alpha = float(eps / 4 if alpha is None else alpha)
        self.steps = int(steps)
        self.random_start = random_start

    def perturb(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            raise ValueError("EmbeddingPGD needs targets= (the embeddings to move away from)")
        images, targets = images.detach(), targets.detach()
        if self.eps == 0 or self.steps == 0:
            return images.clone()
        return self._signed_ascent(images, lambda embeddings: embedding_distance(embeddings, targets).mean(),
                                   self.steps, self.alpha, self.random_start)
