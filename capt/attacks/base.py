"""A small shared base for L∞ attacks on classifiers that take pixels in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn


class Attack:
    """Threat model: L∞ ball of radius ``eps`` around the clean image, in pixel units of [0, 1]
    (normalisation is inside the model), images clipped to [0, 1].

    The model is any module mapping pixels ``[N, 3, H, W]`` to logits. Attacks never change its
    parameters' ``.grad`` nor its train/eval mode.
    """

    def __init__(self, model: nn.Module, eps: float, seed: int | None = None):
        if not (eps >= 0):  # also refuses NaN
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.model = model
        self.eps = float(eps)
        self.seed = seed

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator

    def _uniform_noise(self, like: torch.Tensor) -> torch.Tensor:
        generator = self._generator(like.device)
        noise = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (2 * noise - 1) * self.eps

    def project(self, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        delta = torch.clamp(adv - clean, -self.eps, self.eps)
        return torch.clamp(clean + delta, 0.0, 1.0)

    def _signed_ascent(self, images: torch.Tensor, objective, steps: int, alpha: float,
                       random_start: bool) -> torch.Tensor:
        """``steps`` signed-gradient steps of size ``alpha`` up ``objective(model(adv))``, from a uniform
        random point of the ball (or the clean image), projected onto the ball and [0, 1] after each."""
        images = images.detach()
        adv = images.clone()
        if random_start:
            adv = self.project(adv + self._uniform_noise(adv), images)
        for _ in range(steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                grad, = torch.autograd.grad(objective(self.model(adv)), adv)
            adv = self.project(adv.detach() + alpha * grad.sign(), images)
        return adv.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.perturb(images, labels, **kwargs)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        raise NotImplementedError
