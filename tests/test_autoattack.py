"""The evaluation attacks (capt/attacks/apgd.py, fab.py, square.py, autoattack.py): the threat model, the
package's contract (parameters' gradients, modes and the caller's RNG left alone, fp32 only), AutoAttack's
sequence, and cross-checks against independent implementations: torchattacks' own AutoAttack and the
Adversarial Robustness Toolbox (ART)."""
import math

import numpy as np
import pytest
import torch
import torchattacks

from capt import PromptConfig, PromptedCLIP, ZeroShotClassifier
from capt.attacks._torchattacks import AttackNotApplicable
from capt.attacks.apgd import APGDCE, APGDT
from capt.attacks.autoattack import EVAL_ATTACKS, AttackBudget, AutoAttack
from capt.attacks.fab import FABT
from capt.attacks.precision import PrecisionError
from capt.attacks.square import Square

LABELS = ["red", "green", "blue", "yellow", "black"]
# Small budgets: these tests check behaviour, not strength.
SMALL = AttackBudget(pgd_steps=5, apgd_steps=10, fab_steps=10, square_queries=100, n_target_classes=2)


@pytest.fixture(scope="module")
def classifier(tiny_clip):
    # Vision prompts on, so that the image path has trainable parameters whose .grad must stay untouched.
    model = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=2, vision_n_ctx=2))
    with torch.no_grad():
        return ZeroShotClassifier(model, model.encode_labels(LABELS)).eval()


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _predict(classifier, images):
    with torch.no_grad():
        return classifier(images).argmax(-1)


@pytest.mark.parametrize("name", list(EVAL_ATTACKS))
def test_stays_in_the_threat_model_and_leaves_the_model_and_the_rng_alone(classifier, name):
    images = _images(8)
    labels = _predict(classifier, images)
    eps = 8 / 255
    classifier.train()  # a mode the attack must give back (torchattacks switches to eval and back)
    state = torch.get_rng_state()
    try:
        adversarial = EVAL_ATTACKS[name](classifier, eps, n_classes=len(LABELS), seed=0, budget=SMALL)(images, labels)
        assert classifier.training and classifier.model.training
    finally:
        classifier.eval()
    assert (adversarial - images).abs().max() <= eps + 1e-7
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert adversarial.dtype == torch.float32 and adversarial.shape == images.shape
    # torchattacks reseeds the global RNG with its seed: the caller's stream must not be reset by an evaluation
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in classifier.parameters())  # FAB calls .backward()
    assert all(p.requires_grad for p in classifier.model.prompt_parameters().values())


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square", "autoattack"])
def test_a_seed_reproduces_the_attack(classifier, name):
    images = _images(6, seed=1)
    labels = _predict(classifier, images)

    def run(seed):
        return EVAL_ATTACKS[name](classifier, 8 / 255, n_classes=len(LABELS), seed=seed, budget=SMALL)(images, labels)
    assert torch.equal(run(3), run(3))


@pytest.mark.parametrize("make", [lambda c: APGDCE(c, 4 / 255), lambda c: Square(c, 4 / 255, queries=10),
                                  lambda c: AutoAttack(c, 4 / 255, len(LABELS), budget=SMALL)])
def test_refuses_to_attack_under_autocast(classifier, make):
    images = _images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(PrecisionError, match="autocast"):
            make(classifier)(images, _predict(classifier, images))


def test_zero_eps_returns_the_clean_images(classifier):
    images = _images(4)
    labels = _predict(classifier, images)
    for name in EVAL_ATTACKS:
        assert torch.equal(EVAL_ATTACKS[name](classifier, 0.0, n_classes=5, seed=0, budget=SMALL)(images, labels), images)


def test_target_classes_are_capped_at_the_wrong_classes_and_at_autoattacks_nine(classifier):
    assert APGDT(classifier, 1 / 255, n_classes=5).n_target_classes == 4
    assert APGDT(classifier, 1 / 255, n_classes=1000).n_target_classes == 9  # torchattacks alone would use 999
    assert FABT(classifier, 1 / 255, n_classes=3).n_target_classes == 2
    assert FABT(classifier, 1 / 255, n_classes=1000)._library_attack().n_target_classes == 9


def test_targeted_dlr_needs_four_classes_and_autoattack_leaves_it_out(classifier):
    with pytest.raises(AttackNotApplicable, match="at least 4 classes"):
        APGDT(classifier, 1 / 255, n_classes=3)
    attack = AutoAttack(classifier, 1 / 255, n_classes=3, budget=SMALL)
    assert [name for name, _ in attack.stages] == ["apgd-ce", "fab-t", "square"]
    assert "apgd-t" in attack.skipped


def test_autoattack_runs_each_stage_only_on_the_images_still_correct(classifier):
    """The standard sequence's rule: a stage sees exactly the images that were correct clean and that no
    earlier stage fooled, and an image's result is the first adversarial that fooled it."""
    images = _images(16, seed=2)
    labels = _predict(classifier, images)
    labels[:2] = (labels[:2] + 1) % len(LABELS)  # two images misclassified to begin with
    attack = AutoAttack(classifier, 6 / 255, len(LABELS), seed=0, budget=SMALL)
    calls = {}

    def spying(name, stage):
        def call(x, y):
            calls[name] = x.clone()
            return stage(x, y)
        return call
    stages = list(attack.stages)
    attack.stages = [(name, spying(name, stage)) for name, stage in stages]
    adversarial, fooled = attack.run(images, labels)
    still = _predict(classifier, images) == labels
    assert not still[:2].any()
    for name, _ in stages:
        expected = images[still]
        if name in calls:
            assert torch.equal(calls[name], expected), name
        else:
            assert not still.any()
        still = still & ~fooled[name]
    assert sum(int(mask.sum()) for mask in fooled.values()) > 0  # something was fooled, so the subsets shrank
    fooled_any = torch.stack(list(fooled.values())).any(0)
    assert torch.equal(_predict(classifier, adversarial) != labels, fooled_any | ~(_predict(classifier, images) == labels))
    assert torch.equal(adversarial[~fooled_any], images[~fooled_any])


def test_autoattack_matches_torchattacks_autoattack_configured_alike(classifier):
    """torchattacks.AutoAttack is the sequence with its own defaults (10 iterations, all n_classes - 1
    targets, 5000 Square queries); configured alike, ours must give the same images: same components,
    same seed, same still-correct subsets."""
    images = _images(16, seed=3)
    labels = _predict(classifier, images)
    budget = AttackBudget(apgd_steps=10, fab_steps=10, square_queries=200, n_target_classes=len(LABELS) - 1)
    eps = 3 / 255
    ours, fooled = AutoAttack(classifier, eps, len(LABELS), seed=0, budget=budget).run(images, labels)
    reference = torchattacks.AutoAttack(classifier, norm="Linf", eps=eps, version="standard", n_classes=len(LABELS), seed=0)
    reference._autoattack.attacks[3].n_queries = 200  # Square's budget (fixed at 5000 in torchattacks)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    for p in trainable:  # torchattacks' FAB would otherwise fill the prompts' .grad
        p.requires_grad_(False)
    try:
        theirs = reference(images, labels)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    assert int(fooled["apgd-ce"].sum()) > 0
    assert torch.allclose(ours, theirs, atol=1e-6)


# --- the Adversarial Robustness Toolbox as a second, independent implementation -------------------------

N_ART = 64


@pytest.fixture(scope="module")
def art_setup(tiny_clip):
    from art.estimators.classification import PyTorchClassifier
    model = PromptedCLIP(tiny_clip)
    with torch.no_grad():
        classifier = ZeroShotClassifier(model, model.encode_labels(LABELS)).eval()
    images = _images(N_ART, seed=4)
    labels = _predict(classifier, images)  # clean accuracy 100%
    estimator = PyTorchClassifier(model=classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                  nb_classes=len(LABELS), clip_values=(0.0, 1.0), device_type="cpu")
    return classifier, estimator, images, labels


def _art_apgd(estimator, images, labels, eps, steps=100):
    from art.attacks.evasion import AutoProjectedGradientDescent
    np.random.seed(0)  # ART draws its random start from numpy's global RNG
    # One random start, initial step 2·eps and 100 iterations: the budget of our APGD-CE (torchattacks).
    attack = AutoProjectedGradientDescent(estimator, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                          targeted=False, nb_random_init=1, batch_size=N_ART,
                                          loss_type="cross_entropy", verbose=False)
    return torch.from_numpy(attack.generate(images.numpy(), labels.numpy()))


def _art_square(estimator, images, labels, eps, queries):
    from art.attacks.evasion import SquareAttack
    np.random.seed(0)
    attack = SquareAttack(estimator, norm=np.inf, eps=eps, max_iter=queries, p_init=0.8, nb_restarts=1,
                          batch_size=N_ART, verbose=False)
    return torch.from_numpy(attack.generate(images.numpy(), labels.numpy()))


def _accuracy(classifier, adversarial, labels):
    return (_predict(classifier, adversarial) == labels).float().mean().item()


def _tolerance(p, n=N_ART):
    """Three standard deviations of the difference of two independent binomial proportions at rate p over n
    images: the most two correct attacks whose random starts (and nothing else) differ may disagree by,
    taking their per-image outcomes as independent given the rate (the worst case: in fact they correlate
    strongly and, on this model, agree exactly)."""
    return 3 * math.sqrt(2 * p * (1 - p) / n) + 1 / n


@pytest.mark.parametrize("eps", [2 / 255, 3 / 255])
def test_apgd_ce_robust_accuracy_agrees_with_art(art_setup, eps):
    """Same model, images and budget. A wrong eps scale, normalisation outside the model (a 3.7× smaller
    budget) or a broken step schedule moves robust accuracy far more than the tolerance: at these eps it
    sits mid-range (about 0.6-0.85 here), where such bugs show."""
    classifier, estimator, images, labels = art_setup
    ours = _accuracy(classifier, APGDCE(classifier, eps, seed=0)(images, labels), labels)
    theirs = _accuracy(classifier, _art_apgd(estimator, images, labels, eps), labels)
    assert 0.2 < theirs < 0.95, theirs  # mid-range, or the comparison would say nothing
    assert abs(ours - theirs) <= _tolerance((ours + theirs) / 2), (ours, theirs)


def test_apgd_ce_and_art_agree_exactly_where_nothing_is_random(art_setup):
    """Where the outcome does not depend on either implementation's randomness they must agree exactly: with
    eps = 1 (the ball holds the whole [0, 1] cube) both fool every image; at eps = 0 ours returns the clean
    images, so robust accuracy is the clean accuracy (ART refuses eps = 0, next test); and every adversarial
    of both lies in the eps ball and in [0, 1]."""
    classifier, estimator, images, labels = art_setup
    assert _accuracy(classifier, APGDCE(classifier, 1.0, steps=20, seed=0)(images, labels), labels) == 0.0
    assert _accuracy(classifier, _art_apgd(estimator, images, labels, 1.0, steps=20), labels) == 0.0
    assert torch.equal(APGDCE(classifier, 0.0, seed=0)(images, labels), images)
    for eps in (2 / 255, 8 / 255):
        for adversarial in (APGDCE(classifier, eps, steps=20, seed=0)(images, labels),
                            _art_apgd(estimator, images, labels, eps, steps=20)):
            assert (adversarial - images).abs().max() <= eps + 1e-6
            assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_art_refuses_eps_zero(art_setup):
    """Why the eps = 0 check above is ours alone."""
    from art.attacks.evasion import AutoProjectedGradientDescent
    _, estimator, _, _ = art_setup
    with pytest.raises(ValueError, match="eps"):
        AutoProjectedGradientDescent(estimator, eps=0.0, eps_step=0.0, verbose=False)


@pytest.mark.parametrize("eps", [8 / 255, 16 / 255])
def test_square_robust_accuracy_agrees_with_art(art_setup, eps):
    classifier, estimator, images, labels = art_setup
    ours = _accuracy(classifier, Square(classifier, eps, queries=300, seed=0)(images, labels), labels)
    theirs = _accuracy(classifier, _art_square(estimator, images, labels, eps, 300), labels)
    assert 0.1 < theirs < 0.95, theirs
    assert abs(ours - theirs) <= _tolerance((ours + theirs) / 2), (ours, theirs)


def test_autoattack_runs_on_vit_b_32(vitb32_clip):
    """The paper's backbone (random weights: no download), 224-pixel images, with small budgets so that it
    stays a test; the standard budgets on it are a documented command (about a minute for 16 images on 2
    CPU cores), not a test. Labels are the model's own predictions, so every stage has images to attack."""
    model = PromptedCLIP(vitb32_clip)
    labels_text = ["red", "green", "blue", "yellow"]
    with torch.no_grad():
        classifier = ZeroShotClassifier(model, model.encode_labels(labels_text)).eval()
    images = _images(2, size=vitb32_clip.image_size, seed=5)
    labels = _predict(classifier, images)
    budget = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=20, n_target_classes=1)
    eps = 0.1 / 255  # small, so that the later stages still have images to attack on this random model
    adversarial, fooled = AutoAttack(classifier, eps, len(labels_text), budget=budget).run(images, labels)
    assert list(fooled) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert (adversarial - images).abs().max() <= eps + 1e-7
    assert adversarial.min() >= 0 and adversarial.max() <= 1
