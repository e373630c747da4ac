"""What the probe needs beyond ``capt.attacks.PGD``: APGD-CE, the 8-bit grid that every image a client
can upload lies on, and a differentiable copy of the model's resize for attacks on the upload itself.

Threat model of everything here: L∞ ball of radius ``eps`` around a clean image, in pixel units of
[0, 1], images clipped to [0, 1]. An adversarial image only counts once it is an 8-bit image
(every pixel k/255) inside that ball: that is what a client can send, so a probe that judged a
float image could report flips that no upload reaches. The clean images the probe starts from are on
that grid (an upload is decoded to 8 bits, and PIL's resize writes 8 bits again), so the only 8-bit image
within an eps under 1/255 of one is the clean image itself.

Kept in ``serving/`` on purpose: ``capt/attacks/`` is the evaluation's package, and the probe's APGD
has needs of its own (a seeded generator instead of the process-wide RNG, the best image even when
the attack fails).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

LEVELS = 255
# Slack when deciding which grid values lie in the ball, in grid steps: a float32 pixel k/255 times
# 255 is k only to about 1e-5, and an eps like 8/255 times 255 is 8 only to about 1e-15. Far below a
# step, so no value a step outside the ball is ever admitted.
_GRID_SLACK = 1e-3


def on_grid(pixels: torch.Tensor) -> bool:
    """Whether every pixel is k/255 (within float32 precision)."""
    scaled = pixels.double() * LEVELS
    return bool((scaled - scaled.round()).abs().max() <= _GRID_SLACK) if pixels.numel() else True


def quantise(adversarial: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """The nearest 8-bit image to ``adversarial`` that stays in the eps ball around ``clean`` and in
    [0, 1]: each pixel is rounded to k/255, and where rounding would leave the ball it is rounded
    towards the clean pixel instead (the clamp to the ball's grid values below).

    A pixel with no grid value in its ball (possible only for an off-grid clean pixel and an eps under
    half a step; the probe's clean images are on the grid) keeps its clean value: a zero change is
    always allowed, and the image is then reported as not quantised (``on_grid``)."""
    clean64 = clean.double() * LEVELS
    radius = eps * LEVELS
    low = torch.ceil(clean64 - radius - _GRID_SLACK).clamp(min=0)
    high = torch.floor(clean64 + radius + _GRID_SLACK).clamp(max=LEVELS)
    rounded = torch.minimum(torch.maximum(torch.round(adversarial.double() * LEVELS), low), high)
    rounded = torch.where(low <= high, rounded, clean64)
    return (rounded / LEVELS).to(adversarial.dtype)


def linf_255(a: torch.Tensor, b: torch.Tensor) -> float:
    """L∞ distance in grid steps (/255), rounded to 1e-3: exact integers for two 8-bit images."""
    return round(float((a.double() - b.double()).abs().max()) * LEVELS, 3) if a.numel() else 0.0


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An image -> [1, 3, H, W] in [0, 1], on the grid by construction; other modes than RGB become RGB
    as ``capt.images`` makes them for the model (transparency on white, 16-bit rescaled)."""
    from capt.images import to_rgb
    array = np.array(image if image.mode == "RGB" else to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / LEVELS


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] (or [1, 3, H, W]) in [0, 1] -> 8-bit RGB; exact for pixels on the grid."""
    pixels = pixels[0] if pixels.dim() == 4 else pixels
    array = (pixels.detach().double().clamp(0, 1) * LEVELS).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


# ---- APGD-CE -------------------------------------------------------------------------------------
def apgd_ce(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
            random_start: bool = True, generator: torch.Generator | None = None, rho: float = 0.75) -> torch.Tensor:
    """Untargeted APGD with the cross-entropy loss, L∞ (Croce & Hein, "Reliable evaluation of adversarial
    robustness with an ensemble of diverse parameter-free attacks", ICML 2020, arXiv:2003.01690).

    Threat model: L∞ ball of radius ``eps`` around ``images`` (pixels in [0, 1]), ``steps`` gradient
    steps. No step size to tune: it starts at 2·eps and is halved at checkpoints where the loss stopped
    rising (fewer than ``rho`` of the steps since the last checkpoint improved it, or no new best since
    then), restarting from the best point; a momentum of 0.25 after the first step.

    Step for step the reference implementation (auto-attack's ``APGDAttack`` as torchattacks 3.5.1's
    ``APGD`` carries it, checked by a test), except: the random start comes from ``generator`` instead
    of reseeding the process-wide RNG (which other threads of a server share), ``random_start=False``
    starts at the clean image, and the answer per image is the last misclassified iterate if any, else
    the highest-loss one (the reference returns the clean image where it fails, which would report no
    margin at all). ``model`` maps pixels to logits; gradients are taken with respect to the pixels
    only."""
    x = images.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    n = x.shape[0]
    steps_2, steps_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    if random_start:
        t = 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1
        x_adv = x + eps * torch.ones([n, 1, 1, 1]) * t / t.reshape([n, -1]).abs().max(dim=1, keepdim=True)[0].reshape([-1, 1, 1, 1])
    else:
        x_adv = x.clone()
    x_adv = x_adv.clamp(0.0, 1.0)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss_steps = torch.zeros([steps, n])

    def loss_and_gradient(point: torch.Tensor):
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(point)
            loss_indiv = F.cross_entropy(logits, labels, reduction="none")
            grad, = torch.autograd.grad(loss_indiv.sum(), [point])
        return logits.detach(), loss_indiv.detach(), grad.detach()

    logits, loss_indiv, grad = loss_and_gradient(x_adv)
    grad_best = grad.clone()
    fooled = logits.argmax(1) != labels
    x_best_adv[fooled] = x_adv[fooled]
    ever_fooled = fooled.clone()
    loss_best = loss_indiv.clone()
    step_size = eps * torch.ones([n, 1, 1, 1]) * torch.tensor([2.0]).reshape([1, 1, 1, 1])
    x_adv_old = x_adv.clone()
    k, counter3 = steps_2, 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = np.ones(n, dtype=bool)
    for i in range(steps):
        with torch.no_grad():
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + step_size * torch.sign(grad), x - eps), x + eps), 0.0, 1.0)
            x_adv_1 = torch.clamp(torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps),
                                            x + eps), 0.0, 1.0)
            x_adv = x_adv_1 + 0.0
        logits, loss_indiv, grad = loss_and_gradient(x_adv)
        fooled = logits.argmax(1) != labels
        x_best_adv[fooled] = x_adv[fooled]
        ever_fooled |= fooled
        with torch.no_grad():
            loss_steps[i] = loss_indiv
            improved = loss_indiv > loss_best
            x_best[improved] = x_adv[improved]
            grad_best[improved] = grad[improved]
            loss_best[improved] = loss_indiv[improved]
            counter3 += 1
            if counter3 == k:
                oscillating = _check_oscillation(loss_steps.numpy(), i, k, rho)
                no_improvement = ~reduced_last_check & (loss_best_last_check.numpy() >= loss_best.numpy())
                reduce = oscillating | no_improvement
                reduced_last_check = reduce.copy()
                loss_best_last_check = loss_best.clone()
                if reduce.any():
                    where = torch.from_numpy(reduce)
                    step_size[where] /= 2.0
                    x_adv[where] = x_best[where]
                    grad[where] = grad_best[where]
                counter3 = 0
                k = max(k - size_decr, steps_min)
    return torch.where(ever_fooled.reshape([-1, 1, 1, 1]), x_best_adv, x_best).detach()


def _check_oscillation(losses: np.ndarray, j: int, k: int, rho: float) -> np.ndarray:
    """True where at most ``rho`` of the last ``k`` steps raised the loss. As in the reference, the
    step before the first one reads ``losses[-1]``, the not yet written last row (zeros): at the first
    checkpoint the first step always counts as a rise."""
    rises = np.zeros(losses.shape[1])
    for c in range(k):
        rises += losses[j - c] > losses[j - c - 1]
    return rises <= k * rho


# ---- the model's resize, differentiable ----------------------------------------------------------
class UnsupportedPreprocessing(ValueError):
    """The model's eval transform has a step this module has no differentiable copy of."""


def _straight_through(value: torch.Tensor, forward_value: torch.Tensor) -> torch.Tensor:
    """``forward_value`` in the forward pass, the gradient of ``value`` in the backward pass (BPDA with
    the identity: Athalye, Carlini & Wagner, ICML 2018, arXiv:1802.00420)."""
    return value + (forward_value - value).detach()


def _to_8_bits(pixels: torch.Tensor) -> torch.Tensor:
    """What PIL does after each resampling pass of an 8-bit image: clip to [0, 255] and round. The
    gradient passes straight through, so that saturated pixels (a white background) still get one."""
    return _straight_through(pixels, torch.round(pixels.clamp(0, 1) * LEVELS) / LEVELS)


class UploadTransform(nn.Module):
    """A differentiable copy of the served eval transform (open_clip's, as ``capt.images.pixel_transform``
    builds it) on a float upload ``[N, 3, H, W]``: the same output sizes and crops, taken from the real
    transform steps, and PIL's resampling imitated as PIL runs it on an 8-bit image: the horizontal
    pass, rounding to 8 bits, the vertical pass, rounding again, each pass bicubic (or bilinear) with
    antialiasing. Rounding is straight-through in the backward pass.

    Measured against PIL on toy-world uploads of 33x97 to 1000x700 with pixel noise: at most 2/255 apart,
    on under 0.2% of the model-input pixels, and equal for an upload at the model's own size (PIL leaves
    it untouched); one torch resize in float, without the passes and rounding, was up to 2.9/255 apart
    (0.3/255 on average). It only steers the attack: every judgment uses the real PIL pipeline."""

    def __init__(self, preprocess_cfg: dict[str, Any]):
        super().__init__()
        import open_clip
        from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize
        from open_clip.transform import MaybeConvertMode, MaybeToTensor

        # The same arguments as capt.images.pixel_transform; a test checks this copy against it.
        transform = open_clip.image_transform(
            preprocess_cfg["size"], is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
            resize_mode=preprocess_cfg.get("resize_mode", "shortest"),
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            fill_color=preprocess_cfg.get("fill_color", 0))
        modes = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
        self.steps: list[tuple[str, Any]] = []
        self._sizes: dict[tuple, tuple[int, int]] = {}
        for step in transform.transforms:
            if isinstance(step, Resize) and step.interpolation in modes and step.antialias is not False \
                    and step.max_size is None:
                self.steps.append(("resize", step))
                self.mode = modes[step.interpolation]
            elif isinstance(step, CenterCrop):
                self.steps.append(("crop", step))
            elif isinstance(step, (MaybeConvertMode, MaybeToTensor)):
                continue  # RGB and tensors already
            elif isinstance(step, Normalize) and all(m == 0 for m in step.mean) and all(s == 1 for s in step.std):
                continue
            else:
                raise UnsupportedPreprocessing(f"no differentiable copy of the model's preprocessing step {step!r}")

    def output_size(self, step, width: int, height: int) -> tuple[int, int]:
        """The real resize step's own output size, from a blank image of this size: no copy of its rule
        to drift from it. Cached: an attack asks once per forward pass."""
        key = (id(step), width, height)
        if key not in self._sizes:
            self._sizes[key] = step(Image.new("L", (width, height))).size
        return self._sizes[key]

    def forward(self, upload: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        pixels = upload
        for kind, step in self.steps:
            if kind == "resize":
                height, width = pixels.shape[-2:]
                new_width, new_height = self.output_size(step, width, height)
                if new_width != width:
                    pixels = _to_8_bits(F.interpolate(pixels, size=(height, new_width), mode=self.mode,
                                                      antialias=True, align_corners=False))
                if new_height != height:
                    pixels = _to_8_bits(F.interpolate(pixels, size=(new_height, new_width), mode=self.mode,
                                                      antialias=True, align_corners=False))
            else:
                pixels = TF.center_crop(pixels, list(step.size))
        return pixels


def default_step_size(eps: float, steps: int) -> float:
    """PGD's step when none is given: ``max(eps/4, 2.5·eps/steps)``. With ten steps or more, eps/4; with
    fewer, large enough that ``steps`` steps cover the ball's diameter and can reach its edge from
    anywhere inside (Madry et al. use 2.5·eps/steps)."""
    return max(eps / 4, 2.5 * eps / max(steps, 1))


def finite_nonnegative(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def grid_room(clean: torch.Tensor, eps: float) -> int:
    """The width, in grid steps, of the widest pixel's range of 8-bit values inside the ball (2 for an
    on-grid pixel and eps 1/255: one step down, one up). 0 means that no 8-bit image other than the
    (on-grid) clean one lies in the ball, i.e. an attack can do nothing."""
    clean64 = clean.double() * LEVELS
    low = torch.ceil(clean64 - eps * LEVELS - _GRID_SLACK).clamp(min=0)
    high = torch.floor(clean64 + eps * LEVELS + _GRID_SLACK).clamp(max=LEVELS)
    return int((high - low).max()) if clean.numel() else 0
