import math

import pytest
import torch

from capt.losses import LossConfig, capt_loss

# Two samples, three classes, written out so that every figure below can be checked by hand.
LABELS = torch.tensor([0, 2])
CLEAN = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
ADV = torch.tensor([[0.5, 1.5, -0.5], [0.2, 1.2, -0.4]])
FROZEN = torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.2, 1.5]])


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def cross_entropy(logits, labels):
    return sum(-math.log(softmax(row)[y]) for row, y in zip(logits.tolist(), labels.tolist())) / len(labels)


def kl(p_logits, q_logits):
    p, q = softmax(p_logits), softmax(q_logits)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def by_hand(config, ce_input):
    ce = cross_entropy(ce_input, LABELS)
    total = 0.0
    for i, y in enumerate(LABELS.tolist()):
        frozen_p = softmax(FROZEN[i].tolist())
        alpha = {"soft": frozen_p[y], "hard": float(max(range(3), key=lambda c: frozen_p[c]) == y),
                 "fixed": config.alpha}[config.alpha_mode]
        trades = kl(CLEAN[i].tolist(), ADV[i].tolist()) if config.trades else 0.0
        consistency = kl(FROZEN[i].tolist(), ADV[i].tolist()) if config.consistency else 0.0
        total += (1 - alpha) * trades + alpha * consistency
    return ce + config.lam * total / len(LABELS)


@pytest.mark.parametrize("config", [
    LossConfig(),                                                  # CAPT, soft alpha
    LossConfig(alpha_mode="hard"),
    LossConfig(alpha_mode="fixed", alpha=0.3),
    LossConfig(trades=False),                                      # ablation: no clean/adversarial KL
    LossConfig(consistency=False),                                 # ablation: no frozen-CLIP term
    LossConfig(consistency=False, alpha_mode="fixed", alpha=0.0),  # FAP-like
    LossConfig(lam=0.7),
])
def test_capt_loss_matches_hand_computation(config):
    loss, parts = capt_loss(config, LABELS, CLEAN, ADV, FROZEN)
    assert loss.item() == pytest.approx(by_hand(config, CLEAN), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(loss.item())
    assert parts["ce"].item() == pytest.approx(cross_entropy(CLEAN, LABELS), rel=1e-5)


def test_soft_alpha_is_the_frozen_probability_of_the_true_class():
    _, parts = capt_loss(LossConfig(), LABELS, CLEAN, ADV, FROZEN)
    expected = (softmax(FROZEN[0].tolist())[0] + softmax(FROZEN[1].tolist())[2]) / 2
    assert parts["alpha"].item() == pytest.approx(expected, rel=1e-6)


def test_fap_is_ce_plus_one_and_a_half_trades():
    fap = LossConfig(consistency=False, alpha_mode="fixed", alpha=0.0)
    loss, _ = capt_loss(fap, LABELS, CLEAN, ADV)  # needs no frozen model
    expected = cross_entropy(CLEAN, LABELS) + 1.5 * (kl(CLEAN[0].tolist(), ADV[0].tolist()) + kl(CLEAN[1].tolist(), ADV[1].tolist())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert not fap.needs_frozen


def test_adversarial_ce_alone_for_apt_style_methods():
    loss, parts = capt_loss(LossConfig(ce_on="adv", lam=0.0), LABELS, CLEAN, ADV)
    assert loss.item() == pytest.approx(cross_entropy(ADV, LABELS), rel=1e-6)
    assert set(parts) == {"ce", "loss"}


def test_parts_are_detached_tensors_that_the_trainer_reads_back_once_per_epoch():
    clean, adv = CLEAN.clone().requires_grad_(True), ADV.clone().requires_grad_(True)
    _, parts = capt_loss(LossConfig(), LABELS, clean, adv, FROZEN)
    assert set(parts) == {"ce", "kl_trades", "kl_consistency", "alpha", "loss"}
    for name, part in parts.items():
        assert isinstance(part, torch.Tensor) and part.dim() == 0 and not part.requires_grad, name


def test_kl_targets_are_detached():
    clean = CLEAN.clone().requires_grad_(True)
    adv = ADV.clone().requires_grad_(True)
    loss, _ = capt_loss(LossConfig(ce_on="adv"), LABELS, clean, adv, FROZEN)
    loss.backward()
    assert clean.grad is None or torch.all(clean.grad == 0)
    assert adv.grad.abs().sum() > 0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="alpha_mode"):
        LossConfig(alpha_mode="sometimes")
    with pytest.raises(ValueError, match="alpha"):
        LossConfig(alpha=1.5)
    with pytest.raises(ValueError, match="unknown loss option"):
        LossConfig.from_dict({"lambda": 1})
