import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks

from capt import PromptedCLIP, ZeroShotClassifier
from capt.attacks import PGD

LABELS = ["red", "green", "blue", "yellow", "black"]


@pytest.fixture(scope="module")
def classifier(tiny_clip):
    model = PromptedCLIP(tiny_clip)
    with torch.no_grad():
        return ZeroShotClassifier(model, model.encode_labels(LABELS)).eval()


@pytest.fixture(scope="module")
def images(tiny_clip):
    return torch.rand(12, 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(0))


def _own_predictions(classifier, images):
    with torch.no_grad():
        return classifier(images).argmax(-1)


@pytest.mark.parametrize("eps,alpha,steps", [(4 / 255, 1 / 255, 10), (8 / 255, 2 / 255, 5)])
def test_matches_torchattacks_pgd(classifier, images, eps, alpha, steps):
    labels = _own_predictions(classifier, images)
    ours = PGD(classifier, eps=eps, alpha=alpha, steps=steps, random_start=False)(images, labels)
    reference = torchattacks.PGD(classifier, eps=eps, alpha=alpha, steps=steps, random_start=False)(images, labels)
    assert (ours - images).abs().max() > 0
    assert torch.allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("eps,alpha,steps", [(4 / 255, 1 / 255, 10), (8 / 255, 2 / 255, 5)])
def test_matches_art_pgd(classifier, images, eps, alpha, steps):
    """A second reference, independent of torchattacks: the Adversarial Robustness Toolbox's PGD (its
    PyTorch backend). Without a random start both are deterministic and take the same signed steps."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier
    labels = _own_predictions(classifier, images)
    ours = PGD(classifier, eps=eps, alpha=alpha, steps=steps, random_start=False)(images, labels)
    estimator = PyTorchClassifier(model=classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                  nb_classes=len(LABELS), clip_values=(0.0, 1.0), device_type="cpu")
    reference = ProjectedGradientDescent(estimator, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                         num_random_init=0, batch_size=len(images), verbose=False)
    assert torch.allclose(ours, torch.from_numpy(reference.generate(images.numpy(), labels.numpy())), atol=1e-6)


def test_matches_torchattacks_targeted(classifier, images):
    targets = (_own_predictions(classifier, images) + 1) % len(LABELS)
    ours = PGD(classifier, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False, targeted=True)(images, targets)
    reference = torchattacks.PGD(classifier, eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)
    reference.set_mode_targeted_by_label(quiet=True)
    assert torch.allclose(ours, reference(images, targets), atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_stays_in_the_threat_model(classifier, images, loss):
    eps = 4 / 255
    adversarial = PGD(classifier, eps=eps, alpha=2 / 255, steps=5, loss=loss, seed=0)(images, _own_predictions(classifier, images))
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_seeded_random_start_is_reproducible(classifier, images):
    labels = _own_predictions(classifier, images)
    first = PGD(classifier, eps=4 / 255, steps=2, seed=7)(images, labels)
    again = PGD(classifier, eps=4 / 255, steps=2, seed=7)(images, labels)
    other = PGD(classifier, eps=4 / 255, steps=2, seed=8)(images, labels)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_zero_eps_returns_the_clean_images(classifier, images):
    labels = _own_predictions(classifier, images)
    assert torch.equal(PGD(classifier, eps=0.0, steps=10)(images, labels), images)


def test_invalid_arguments_are_refused(classifier):
    with pytest.raises(ValueError, match="eps"):
        PGD(classifier, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        PGD(classifier, eps=-0.1)
    with pytest.raises(ValueError, match="loss"):
        PGD(classifier, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="targeted"):
        PGD(classifier, eps=0.1, loss="kl", targeted=True)


def test_leaves_parameter_gradients_alone(tiny_clip, images):
    from capt import PromptConfig
    model = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=2))
    with torch.no_grad():
        classifier = ZeroShotClassifier(model, model.encode_labels(LABELS))
    PGD(classifier, eps=4 / 255, steps=2, seed=0)(images, torch.zeros(len(images), dtype=torch.long))
    assert all(p.grad is None for p in model.parameters())


def test_accuracy_falls_as_eps_grows(classifier, images):
    """On a model that is not robust, accuracy (here against its own clean predictions) goes from
    100% to near zero as the L∞ budget grows."""
    labels = _own_predictions(classifier, images)
    accuracies = []
    for eps in (0, 1 / 255, 4 / 255, 16 / 255, 64 / 255):
        adversarial = PGD(classifier, eps=eps, steps=20, seed=0)(images, labels)
        with torch.no_grad():
            accuracies.append((classifier(adversarial).argmax(-1) == labels).float().mean().item())
    assert accuracies[0] == 1.0
    assert all(later <= earlier for earlier, later in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] <= 0.1, accuracies


def test_kl_attack_moves_the_prediction_more_than_random_noise(classifier, images):
    eps = 8 / 255
    with torch.no_grad():
        clean = F.softmax(classifier(images), -1)
    adversarial = PGD(classifier, eps=eps, alpha=2 / 255, steps=10, loss="kl", seed=0)(images)
    noisy = (images + eps * torch.sign(torch.randn_like(images))).clamp(0, 1)

    def kl(x):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(classifier(x), -1), clean, reduction="batchmean").item()
    assert kl(adversarial) > 2 * kl(noisy)
