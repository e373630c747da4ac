"""The CAPT training loss and its ablations (see ``shared/reference/capt-method.md``).

    L = CE(f_θ(x_ce), y)
      + λ · mean_i [ (1 − α_i) · KL(p_θ(x_i) ‖ p_θ(x_a,i))      # "trades" term
                    +     α_i  · KL(p_0(x_i) ‖ p_θ(x_a,i)) ]    # "consistency" term

``x_ce`` is the clean image (CAPT, FAP) or the adversarial one (APT, AdvVP, AdvMaPLe). Targets of
the KL terms are detached. The adaptive weight α_i (our reading) is the frozen CLIP's probability of
the true class (``soft``), whether the frozen CLIP is right (``hard``), or a constant (``fixed``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .options import Options

ALPHA_MODES = ("soft", "hard", "fixed")
CE_INPUTS = ("clean", "adv")


@dataclass
class LossConfig(Options):
    SECTION = "loss"

    ce_on: str = "clean"
    lam: float = 1.5
    trades: bool = True
    consistency: bool = True
    alpha_mode: str = "soft"
    alpha: float = 0.5

    def __post_init__(self):
        if self.ce_on not in CE_INPUTS:
            raise ValueError(f"ce_on must be one of {CE_INPUTS}, got '{self.ce_on}'")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got '{self.alpha_mode}'")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


    @property
    def uses_adversarial_kl(self) -> bool:
        return self.lam > 0 and (self.trades or self.consistency)

    @property
    def needs_frozen(self) -> bool:
        """Whether the frozen CLIP's clean prediction p_0 is needed (the consistency term or α)."""
        return self.lam > 0 and (self.consistency or (self.trades and self.alpha_mode != "fixed"))


def kl_per_sample(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ softmax(logits)) for each row."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), target_probs.float(), reduction="none").sum(-1)


def adaptive_alpha(frozen_logits: torch.Tensor | None, labels: torch.Tensor, config: LossConfig) -> torch.Tensor:
    if config.alpha_mode == "fixed":
        return torch.full(labels.shape, config.alpha, device=labels.device)
    frozen_probs = F.softmax(frozen_logits.detach().float(), dim=-1)
    if config.alpha_mode == "soft":
        return frozen_probs.gather(1, labels[:, None]).squeeze(1)
    return (frozen_probs.argmax(-1) == labels).float()


def capt_loss(config: LossConfig, labels: torch.Tensor, clean_logits: torch.Tensor, adv_logits: torch.Tensor,
              frozen_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the loss and its parts for logging: detached 0-d tensors on the logits' device, not
    floats, so that the trainer reads them back once per epoch instead of syncing on every part of
    every step."""
    ce = F.cross_entropy((clean_logits if config.ce_on == "clean" else adv_logits).float(), labels)
    loss, parts = ce, {"ce": ce.detach()}
    if config.uses_adversarial_kl:
        alpha = adaptive_alpha(frozen_logits, labels, config)
        regulariser = torch.zeros_like(alpha)
        if config.trades:
            trades = kl_per_sample(F.softmax(clean_logits.detach().float(), dim=-1), adv_logits)
            regulariser = regulariser + (1 - alpha) * trades
            parts["kl_trades"] = trades.detach().mean()
        if config.consistency:
            consistency = kl_per_sample(F.softmax(frozen_logits.detach().float(), dim=-1), adv_logits)
            regulariser = regulariser + alpha * consistency
            parts["kl_consistency"] = consistency.detach().mean()
        parts["alpha"] = alpha.detach().mean()
        loss = loss + config.lam * regulariser.mean()
    parts["loss"] = loss.detach()
    return loss, parts
