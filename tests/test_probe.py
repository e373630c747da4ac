"""The probe's parts and its promises, in process on the embedded default model: it reaches the edge of
the eps ball with any number of steps, judges only 8-bit images (what a client can upload), reports
where eps lives, and its eps search gives a radius between a hold and a flip that this test checks
on its own."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import toy_image
from capt.data.toyworld import COLOURS
from capt.prompts import ZeroShotClassifier
from serving import adversarial
from serving.adversarial import UploadTransform, apgd_ce, default_step_size, quantise, to_tensor
from serving.errors import RequestError
from serving.model import Limits, ServingModel

LABELS = list(COLOURS)


@pytest.fixture(scope="module")
def served(default_bundle):
    return ServingModel(default_bundle, Limits(probe_precision="fp32", max_probe_seconds=3600))


def _decode(png_base64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB")


def _twin(served, labels):
    return ZeroShotClassifier(served.torch_model, torch.from_numpy(served.class_embeddings(labels)).float())


def _margin(logits, target):
    others = torch.cat([logits[:target], logits[target + 1:]])
    return float(logits[target] - others.max())


def _resized(size, seed=0):
    """A toy-world image at another size than the model's input, with pixel noise (detail that resizing changes)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(toy_image("star", "red").resize(size, Image.BILINEAR), dtype=float)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


# ---- the 8-bit grid -------------------------------------------------------------------------------
def test_quantise_lands_on_the_grid_inside_the_ball_and_in_range():
    generator = torch.Generator().manual_seed(0)
    clean_steps = torch.randint(0, 256, (4, 3, 16, 16), generator=generator).double()
    clean = (clean_steps / 255).float()
    for eps_255 in (1, 2.5, 8, 16):
        eps = eps_255 / 255
        adversarial = (clean + (2 * torch.rand(clean.shape, generator=generator) - 1) * 2 * eps).clamp(0, 1)
        q = quantise(adversarial, clean, eps)
        steps = (q.double() * 255).round()
        assert torch.equal(q, (steps / 255).float())                    # k/255, as an 8-bit upload becomes
        assert float((steps - clean_steps).abs().max()) <= eps_255      # inside the ball
        assert q.min() >= 0 and q.max() <= 1
        # Nearest grid value wherever that is inside the ball; otherwise the ball's grid value nearest to it.
        nearest = (adversarial.double() * 255).round()
        inside = (nearest - clean_steps).abs() <= eps_255
        assert torch.equal(steps[inside], nearest[inside]) and (~inside).any()
        assert torch.equal((steps - clean_steps).abs()[~inside], torch.full_like(steps[~inside], float(int(eps_255))))


def test_rounding_that_would_leave_the_ball_goes_towards_the_clean_pixel():
    clean = torch.tensor([10.0, 10.0, 0.0, 255.0]) / 255
    adversarial = torch.tensor([11.6, 8.4, -3.0, 258.0]) / 255  # rounds to 12 and 8: two steps away
    assert torch.equal(quantise(adversarial, clean, 1 / 255) * 255, torch.tensor([11.0, 9.0, 0.0, 255.0]))


def test_an_eps_under_one_step_admits_only_the_clean_image():
    clean = torch.tensor([10.0, 200.0]) / 255
    assert torch.equal(quantise(clean + 0.9 / 255, clean, 0.9 / 255), clean)
    assert adversarial.grid_room(clean, 0.9 / 255) == 0 and adversarial.grid_room(clean, 1 / 255) == 2


def test_an_off_grid_pixel_with_no_grid_value_in_its_ball_keeps_its_clean_value():
    clean = torch.tensor([10.5]) / 255
    q = quantise(clean + 0.2 / 255, clean, 0.3 / 255)
    assert torch.equal(q, clean) and not adversarial.on_grid(q)


def test_the_default_pgd_step_reaches_the_edge_in_any_number_of_steps():
    eps = 8 / 255
    assert default_step_size(eps, 1) == pytest.approx(2.5 * eps)
    assert default_step_size(eps, 2) == pytest.approx(1.25 * eps)
    assert default_step_size(eps, 10) == pytest.approx(eps / 4)
    assert default_step_size(eps, 100) == pytest.approx(eps / 4)
    for steps in range(1, 40):
        assert steps * default_step_size(eps, steps) >= 2 * eps  # across the ball's diameter


# ---- APGD ---------------------------------------------------------------------------------------
def test_apgd_is_the_reference_step_for_step(served):
    """Our APGD-CE against torchattacks 3.5.1's (auto-attack's) own single run, started from the same
    random point: the same images, bit for bit, whether the attack succeeds or not."""
    torchattacks = pytest.importorskip("torchattacks")
    classifier = _twin(served, LABELS).eval()
    x = torch.cat([to_tensor(toy_image("star", "red")), to_tensor(toy_image("circle", "blue", seed=1))])
    with torch.no_grad():
        y = classifier(x).argmax(1)
    outcomes = set()
    for eps, steps in ((1 / 255, 3), (2 / 255, 10), (8 / 255, 25)):
        reference = torchattacks.APGD(classifier, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=5, loss="ce")
        torch.manual_seed(5)  # where the reference draws its start from
        x_best, robust, _, x_best_adv = reference.attack_single_run(x, y)
        ours = apgd_ce(classifier, x, y, eps, steps, random_start=True, generator=torch.Generator().manual_seed(5))
        # The reference returns the clean image where it fails; we keep its highest-loss point there.
        assert torch.equal(ours, torch.where(robust.reshape(-1, 1, 1, 1), x_best, x_best_adv))
        outcomes.update(robust.tolist())
    assert outcomes == {True, False}  # both branches were compared


def test_apgd_does_not_touch_the_global_rng(served):
    classifier = _twin(served, LABELS).eval()
    x = to_tensor(toy_image())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    apgd_ce(classifier, x, torch.tensor([0]), 4 / 255, 3, random_start=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3), expected)


# ---- the probe reaches the edge of the ball -----------------------------------------------------
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
@pytest.mark.parametrize("steps", [1, 2])
def test_a_probe_with_one_or_two_steps_reaches_the_edge_of_the_ball(served, attack, steps):
    """eps is a whole number of 8-bit steps, so the edge is exactly on the grid: distance 8/255, not less."""
    result = served.probe(toy_image("star", "red"), LABELS, eps=8 / 255, steps=steps, attack=attack)
    assert result["linf_distance_255"] == 8.0
    assert result["attack"]["name"] == attack and result["attack"]["steps"] == steps
    if attack == "pgd":
        assert result["step_size"] == pytest.approx(2.5 * (8 / 255) / steps)


def test_an_explicit_pgd_step_size_is_honoured(served):
    result = served.probe(toy_image("star", "red"), LABELS, eps=8 / 255, steps=1, step_size=2 / 255, attack="pgd")
    assert result["step_size"] == 2 / 255 and result["attack"]["step_size"] == 2 / 255
    assert result["linf_distance_255"] == 2.0


def test_apgd_is_the_default_attack(served):
    result = served.probe(toy_image(), LABELS, eps=4 / 255, steps=3)
    assert result["attack"]["name"] == "apgd" and result["step_size"] is None
    assert result["attack"]["step_size"] == "adaptive" and result["attack"]["initial_step_size"] == 2 * 4 / 255


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_restart_zero_starts_at_the_clean_image_and_later_restarts_at_random_points(served, monkeypatch, attack):
    import serving.model as model_module
    starts = []
    if attack == "pgd":
        real = model_module.PGD

        def spy(*args, **kwargs):
            starts.append((kwargs["random_start"], kwargs["seed"]))
            return real(*args, **kwargs)
        monkeypatch.setattr(model_module, "PGD", spy)
    else:
        real = model_module.apgd_ce

        def spy(*args, **kwargs):
            starts.append((kwargs["random_start"], kwargs["generator"].initial_seed()))
            return real(*args, **kwargs)
        monkeypatch.setattr(model_module, "apgd_ce", spy)
    # 1/255 holds on this image (see the eps search test), so every restart runs.
    result = served.probe(toy_image("star", "red"), LABELS, eps=1 / 255, steps=2, restarts=3, seed=10, attack=attack)
    assert not result["flipped"]
    assert starts == [(False, 10), (True, 11), (True, 12)]


# ---- judged on 8-bit images ---------------------------------------------------------------------
def test_the_probe_judges_the_8_bit_image_it_returns(served):
    """The returned PNG, decoded and preprocessed as an upload, gets from the twin the margin the probe
    reports and from the served graph its label; the attack's own float image got another margin."""
    image, labels = toy_image("star", "red"), LABELS
    # eps off the 8-bit grid: APGD saturates most pixels at +-7.5/255, which the 8-bit image must round
    # to +-7/255 (inside the ball), so the float and the 8-bit image get different margins on any model.
    result = served.probe(image, labels, eps=7.5 / 255, steps=10, attack="apgd", return_images=True)
    assert result["adversarial_quantised"] is True and "8 bits" in result["quantisation_note"]
    assert abs(result["float"]["margin"] - result["margin_adversarial"]) > 1e-2  # 0.6 on the default model
    png = _decode(result["adversarial_png"])
    pixels = torch.from_numpy(served.pixels([png]))
    assert torch.equal(pixels * 255, (pixels * 255).round())
    assert adversarial.linf_255(pixels, torch.from_numpy(served.pixels([image]))) == result["linf_distance_255"] == 7.0
    with torch.no_grad():
        logits = _twin(served, labels)(pixels)[0]
    target = labels.index(result["target"])
    assert _margin(logits, target) == pytest.approx(result["margin_adversarial"], abs=1e-4)
    assert labels[int(logits.argmax())] == result["adversarial"]["label"]
    assert served.classify([png], labels, top_k=1)[0][0]["label"] == result["served_onnx"]["adversarial"]["label"]
    assert result["flipped"] == (result["adversarial"]["label"] != result["target"])


def test_an_eps_under_one_step_can_do_nothing_and_says_so(served):
    result = served.probe(toy_image("star", "red"), LABELS, eps=0.9 / 255, steps=10, attack="pgd")
    assert result["linf_distance"] == 0.0 and not result["flipped"]
    assert result["sanity"]["attack_did_nothing"] is True
    assert result["float"]["linf_distance"] > 0  # the float attack did move: rounding took it back


# ---- the eps search -----------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_the_eps_search_brackets_the_radius_between_a_hold_and_a_flip(served, attack):
    image, steps = toy_image("star", "red"), 5
    search = served.probe(image, LABELS, eps=4 / 255, steps=steps, attack=attack, search_eps=True)["eps_search"]
    assert search["grid_255"] == [1, 2, 4, 8, 16, 32] and search["grid"][0]["eps_255"] == 1
    assert search["resolution_255"] == 1.0 and search["attack"]["name"] == attack
    holding, flipping = search["largest_holding_eps"], search["smallest_flipping_eps"]
    assert flipping is not None and holding is not None
    assert search["smallest_flipping_eps_255"] - search["largest_holding_eps_255"] == 1.0  # refined to one step
    assert flipping == search["smallest_flipping_eps_255"] / 255 and holding == search["largest_holding_eps_255"] / 255
    # The same attack at the flipping eps: its 8-bit image, checked here on its own, is within the
    # eps and the served graph gives it another label than the clean one.
    flip = served.probe(image, LABELS, eps=flipping, steps=steps, attack=attack, return_images=True)
    png = _decode(flip["adversarial_png"])
    clean_pixels = torch.from_numpy(served.pixels([image]))
    assert adversarial.linf_255(torch.from_numpy(served.pixels([png])), clean_pixels) <= search["smallest_flipping_eps_255"]
    assert served.classify([png], LABELS, top_k=1)[0][0]["label"] != flip["target"] == flip["clean"]["label"]
    # ... and at the holding eps it holds.
    hold = served.probe(image, LABELS, eps=holding, steps=steps, attack=attack)
    assert not hold["flipped"] and not hold["served_onnx"]["flipped"]


def test_the_eps_search_without_a_flip_reports_its_largest_hold(default_bundle):
    model = ServingModel(default_bundle, Limits(probe_precision="fp32", max_probe_seconds=3600, max_probe_eps=2 / 255))
    search = model.probe(toy_image("star", "red"), LABELS, eps=1 / 255, steps=2, search_eps=True)["eps_search"]
    assert search["grid_255"] == [1, 2]
    assert search["smallest_flipping_eps"] is None and search["largest_holding_eps_255"] == 2.0


# ---- where eps lives ----------------------------------------------------------------------------
def test_a_resized_upload_is_attacked_in_the_model_input_and_the_answer_says_so(served):
    image = _resized((100, 80))
    result = served.probe(image, LABELS, eps=8 / 255, steps=3, return_images=True)
    assert result["space"] == "input" and result["upload_preprocessed"] is True
    assert result["upload_size"] == [100, 80] and result["input_size"] == [64, 64]
    assert "model input" in result["eps_space"] and "100x80" in result["eps_space"] and "64x64" in result["eps_space"]
    png = _decode(result["adversarial_png"])
    assert png.size == (64, 64)  # a size preprocessing leaves as it is: uploaded, it is the model input itself
    assert torch.equal(torch.from_numpy(served.pixels([png])) * 255, (to_tensor(png) * 255))
    own = served.probe(toy_image(), LABELS, eps=8 / 255, steps=1)
    assert own["upload_preprocessed"] is False and own["upload_size"] == own["input_size"] == [64, 64]


@pytest.mark.parametrize("size", [(100, 80), (48, 48), (200, 150)])
def test_space_upload_attacks_the_upload_and_judges_it_through_the_real_preprocessing(served, size):
    image = _resized(size)
    result = served.probe(image, LABELS, eps=16 / 255, steps=10, space="upload", return_images=True)
    assert result["space"] == "upload" and result["upload_size"] == list(size) and "upload pixels" in result["eps_space"]
    png = _decode(result["adversarial_png"])
    assert png.size == size
    assert adversarial.linf_255(to_tensor(png), to_tensor(image)) == result["linf_distance_255"] <= 16
    assert result["flipped"] and result["served_onnx"]["flipped"]
    pixels = torch.from_numpy(served.pixels([png]))
    with torch.no_grad():
        logits = _twin(served, LABELS)(pixels)[0]
    assert _margin(logits, LABELS.index(result["target"])) == pytest.approx(result["margin_adversarial"], abs=1e-4)
    assert served.classify([png], LABELS, top_k=1)[0][0]["label"] == result["served_onnx"]["adversarial"]["label"]
    assert result["linf_distance_input_255"] == adversarial.linf_255(pixels, torch.from_numpy(served.pixels([image])))
    assert result["surrogate_gap_255"] <= 2


def test_the_differentiable_resize_is_the_served_preprocessing_within_two_levels(served):
    """Measured gap: at most 2/255, on under 1% of model-input pixels; none for an upload at the input size."""
    transform = UploadTransform(served.torch_model.preprocess_cfg)
    for size in [(64, 64), (100, 80), (48, 48), (33, 97), (300, 64), (640, 480)]:
        image = _resized(size)
        ours = transform(to_tensor(image))
        real = torch.from_numpy(served.pixels([image]))
        assert ours.shape == real.shape, size
        gap = (ours - real).abs() * 255
        assert float(gap.max()) <= 2 + 1e-4 and float((gap > 1e-3).float().mean()) < 0.01, size
        if size == (64, 64):
            assert float(gap.max()) == 0.0
    # Every pixel of an upload that is resized but not cropped gets a gradient, saturated white ones too
    # (the clipping and rounding are straight-through).
    for upload in (to_tensor(_resized((80, 80))), torch.ones(1, 3, 80, 80), to_tensor(_resized((48, 48)))):
        upload.requires_grad_(True)
        transform(upload).sum().backward()
        assert upload.grad.abs().min() > 0


def test_space_upload_is_capped_by_its_own_pixel_limit(default_bundle):
    model = ServingModel(default_bundle, Limits(probe_precision="fp32", max_probe_upload_pixels=64 * 64 - 1))
    with pytest.raises(RequestError, match="CAPT_MAX_PROBE_UPLOAD_PIXELS"):
        model.probe(toy_image(), LABELS, space="upload")
    assert model.probe(toy_image(), LABELS, eps=0.0, steps=1)["space"] == "input"  # input space costs the same for any upload


@pytest.mark.parametrize("kwargs,message", [
    ({"attack": "fgsm"}, "attack must be one of"),
    ({"attack": None}, "attack must be one of"),
    ({"space": "pixels"}, "space must be one of"),
    ({"attack": "apgd", "step_size": 1 / 255}, "step_size is for attack 'pgd' only"),
    ({"attack": "pgd", "step_size": -1.0}, "step_size must be"),
    ({"seed": -1}, "seed must be"),
    ({"seed": 2**70}, "seed must be"),
    ({"seed": 1.5}, "seed must be"),
])
def test_bad_new_probe_fields_are_refused(served, kwargs, message):
    with pytest.raises(RequestError, match=message):
        served.probe(toy_image(), LABELS, **kwargs)
