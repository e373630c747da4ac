"""The defects that could make prompt tuning buy no robustness, each ruled out by a test: the training
attack targets the prompts being tuned, its adversarial images are the ones the loss sees, every
prompt (and, for TeCoA, every image-tower weight) gets a gradient, and the frozen CLIP stays in eval
mode while the prompts train. Plus the options added to find out why: the learning curve, a reference
CLIP for f_0, and the image tower tuned as a configuration of the same trainer."""
import json

import pytest
import torch
from safetensors.torch import save_file

import capt.train
from capt import PromptedCLIP, create_clip
from capt.attacks import PGD
from capt.checkpoint import read_checkpoint
from capt.config import TrainConfig
from capt.losses import capt_loss
from capt.prompts import PromptConfig, ZeroShotClassifier
from capt.train import _TrainingStep, train
from test_train import TRAINABLE, make_config

CAPT_PROMPTS = {"text_n_ctx": 2, "text_depth": 3, "vision_n_ctx": 2, "vision_depth": 3, "coupling": "maple"}


def _prompted(prompt=CAPT_PROMPTS, seed=0):
    torch.manual_seed(seed)
    model = PromptedCLIP(create_clip("capt-tiny-vit"), PromptConfig.from_dict(prompt))
    with torch.no_grad():  # prompts far from their initialisation, so that they matter measurably
        for p in model.prompt_parameters().values():
            p.add_(torch.randn_like(p) * 0.5)
    return model


class RecordingPGD(PGD):
    """The training loop's PGD, keeping what it attacked and what it returned."""
    seen: list = []

    def perturb(self, images, labels=None, target_probs=None):
        adversarial = super().perturb(images, labels, target_probs=target_probs)
        RecordingPGD.seen.append({"classifier": self.model, "clean": images, "adversarial": adversarial})
        return adversarial


@pytest.fixture
def recording_pgd(monkeypatch):
    RecordingPGD.seen = []
    monkeypatch.setattr(capt.train, "PGD", RecordingPGD)
    return RecordingPGD.seen


def _one_step(model, recording, eps=8 / 255):
    torch.manual_seed(1)
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    tokens = model.tokenize(["red", "green", "blue"])
    attack = TrainConfig.from_dict({"method": "capt", "attack": {"eps": eps, "steps": 3, "loss": "ce"}}).attack
    step = _TrainingStep(model, tokens, attack, clean_in_graph=True)
    model.train()
    clean_logits, adv_logits = step(images, labels, attack_seed=3)
    return images, labels, clean_logits, adv_logits, recording[-1]


def test_the_training_attack_targets_the_prompts_being_tuned(recording_pgd):
    model = _prompted()
    images, labels, *_, seen = _one_step(model, recording_pgd)
    attacked = seen["classifier"]
    with torch.no_grad():
        text = model.encode_labels(["red", "green", "blue"])
        tuned = model.logits(model.encode_image(images), text)
        with model.prompts_disabled():
            frozen = ZeroShotClassifier(model, model.encode_labels(["red", "green", "blue"]))(images)
        assert torch.allclose(attacked(images), tuned, atol=1e-5)
        # ... and not the frozen CLIP: with these prompts the two disagree by far more than rounding.
        assert (attacked(images) - frozen).abs().max() > 1e-2


def test_the_loss_sees_the_adversarial_images_of_the_attack(recording_pgd):
    model = _prompted()
    images, labels, clean_logits, adv_logits, seen = _one_step(model, recording_pgd)
    with torch.no_grad():
        assert torch.allclose(adv_logits, seen["classifier"](seen["adversarial"]), atol=1e-5)
        assert (seen["adversarial"] - images).abs().max() > 4 / 255  # the attack moved the pixels
        assert (adv_logits - clean_logits).abs().max() > 1e-3  # and the loss sees the difference
        ce_clean = torch.nn.functional.cross_entropy(clean_logits, labels)
        ce_adv = torch.nn.functional.cross_entropy(adv_logits, labels)
    assert ce_adv > ce_clean + 1e-3  # ascent on the tuned model's loss


@pytest.mark.parametrize("method", TRAINABLE)
def test_every_trained_tensor_gets_a_gradient_in_every_layer(method):
    config = TrainConfig.from_dict({"method": method, "attack": {"eps": 4 / 255, "steps": 2}})
    torch.manual_seed(0)
    model = PromptedCLIP(create_clip("capt-tiny-vit"), config.prompt)
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    names = ["red", "green", "blue"]
    step = _TrainingStep(model, model.tokenize(names), config.attack, clean_in_graph=config.loss.ce_on == "clean")
    model.train()
    with torch.no_grad(), model.prompts_disabled():
        frozen = model.logits(model.encode_image(images), model.encode_labels(names))
    clean_logits, adv_logits = step(images, labels, attack_seed=0)
    loss, _ = capt_loss(config.loss, labels, clean_logits, adv_logits, frozen)
    loss.backward()
    trained = {n: p for n, p in model.prompt_parameters().items() if p.numel()}
    assert trained, f"{method} trains nothing"
    for name, param in trained.items():
        assert param.grad is not None, f"{name} gets no gradient"
        rows = param.grad.reshape(param.grad.shape[0], -1) if name.endswith(("_deep", "_ctx")) else param.grad.reshape(1, -1)
        # Each layer's slice of a deep prompt on its own: a layer the prompts skip would have zeros.
        assert (rows.abs().amax(dim=1) > 1e-9).all(), f"{name}: a layer without gradient"
    if config.prompt.tune_image_tower:
        assert any(n.startswith("clip.visual.transformer.resblocks.") for n in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)


def test_the_frozen_clip_stays_in_eval_mode_while_the_prompts_train(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path, colour_folder, epochs=2,
                         curve={"every": 1, "data": f"imagefolder:{colour_folder}:test", "samples": 6})
    modes, real_forward = [], _TrainingStep.forward

    def forward(self, *args, **kwargs):
        modes.append({m.training for m in self.model.clip.modules()})
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(_TrainingStep, "forward", forward)
    train(config, progress=False)
    assert len(modes) == 6 and all(m == {False} for m in modes)  # also after the curve's evaluations


def test_the_learning_curve_is_recorded_and_changes_nothing_else(tmp_path, colour_folder):
    data = f"imagefolder:{colour_folder}:test"
    with_curve = train(make_config(tmp_path / "a", colour_folder, curve={"every": 1, "data": data, "samples": 6,
                                                                         "eps": ["1/255", "2/255"]}), progress=False)
    without = train(make_config(tmp_path / "b", colour_folder), progress=False)
    history = [json.loads(line) for line in (with_curve / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history if "curve" in r] == [1, 2, 3]
    point = history[-1]["curve"]
    assert point["heldout"]["n"] == 6 and point["train"]["n"] == 6 and point["attack"] == "PGD-10"
    assert set(point["heldout"]["robust_acc"]) == {"1/255", "2/255"}
    state_a, state_b = read_checkpoint(with_curve)[1], read_checkpoint(without)[1]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_the_frozen_clip_of_the_loss_can_be_another_checkpoint(tmp_path, colour_folder, monkeypatch):
    torch.manual_seed(5)
    reference = create_clip("capt-tiny-vit")
    path = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, path)
    seen, real = [], capt.train._frozen_image_features
    monkeypatch.setattr(capt.train, "_frozen_image_features",
                        lambda model, *args: seen.append(model) or real(model, *args))
    train(make_config(tmp_path, colour_folder, epochs=1, reference_pretrained=str(path)), progress=False)
    f0 = seen[0].clip.state_dict()
    assert all(torch.equal(f0[k], v) for k, v in reference.model.state_dict().items())


def test_tecoa_tunes_the_image_tower_as_part_of_its_checkpoint(tmp_path, colour_folder):
    config = make_config(tmp_path, colour_folder, method="tecoa", epochs=1, warmup_epochs=0, lr=0.01)
    torch.manual_seed(config.seed)
    original = {k: v.clone() for k, v in create_clip(config.model, None).model.visual.state_dict().items()}
    run_dir = train(config, progress=False)
    state = read_checkpoint(run_dir)[1]
    tuned = {k.removeprefix("clip.visual."): v for k, v in state.items() if k.startswith("clip.visual.")}
    assert set(tuned) == {k for k, v in original.items() if v.is_floating_point()}
    assert max((tuned[k] - original[k]).abs().max().item() for k in tuned) > 1e-4
    # The checkpoint loads back into a model that computes what the tuned one does.
    from capt.checkpoint import load_prompted_model
    model, _ = load_prompted_model(run_dir, pretrained="none")
    assert all(torch.equal(model.clip.visual.state_dict()[k], v) for k, v in tuned.items())


def test_with_a_tuned_image_tower_f0_keeps_the_original_weights(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path, colour_folder, epochs=1, prompt={"tune_image_tower": True})
    torch.manual_seed(config.seed)
    original = create_clip(config.model, None).model.state_dict()
    seen, real = [], capt.train._frozen_image_features
    monkeypatch.setattr(capt.train, "_frozen_image_features",
                        lambda model, *args: seen.append(model) or real(model, *args))
    train(config, progress=False)
    f0 = seen[0].clip.state_dict()
    assert all(torch.equal(f0[k], v) for k, v in original.items())  # after training: a copy, not the tuned tower
