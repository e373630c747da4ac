"""What one training step computes, counted through the public model methods while ``train`` runs:
the label set's text once a step, the clean images in the graph only when the loss uses them, the
frozen CLIP's features once per run, and no host reads of tensors per step."""
import json
import sys
from pathlib import Path

import pytest
import torch

import capt.train
from capt import PromptedCLIP, create_clip
from capt.config import load_method
from capt.data import load_dataset
from capt.models import pixel_transform
from capt.train import train
from test_train import TRAINABLE, make_config

IMAGES = 12  # colour_folder: 3 classes x 4 shots
CAPT_PACKAGE = str(Path(capt.__file__).resolve().parent)


def record_calls(monkeypatch, name: str, describe) -> list:
    """Replace ``PromptedCLIP.<name>`` by a wrapper that appends ``describe(model, argument)``."""
    calls, real = [], getattr(PromptedCLIP, name)

    def wrapper(self, argument, *args, **kwargs):
        calls.append(describe(self, argument))
        return real(self, argument, *args, **kwargs)
    monkeypatch.setattr(PromptedCLIP, name, wrapper)
    return calls


def test_the_label_set_is_encoded_once_per_step(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path, colour_folder, epochs=2, batch_size=4)
    prompted = record_calls(monkeypatch, "encode_text", lambda model, tokens: model.text_prompted)
    train(config, progress=False)
    steps = 2 * IMAGES // 4
    assert sum(prompted) == steps  # the untrained hand prompt of f_0 is the one call without prompts


@pytest.mark.parametrize("method", TRAINABLE)
def test_clean_images_enter_the_graph_only_when_the_loss_differentiates_through_them(
        tmp_path, colour_folder, monkeypatch, method):
    config = make_config(tmp_path, colour_folder, method=method, epochs=1)
    # Rows encoded with grad from pixels that need none: the training forward (the attack's own
    # forwards differentiate with respect to the pixels; the frozen CLIP's run without grad).
    in_graph = record_calls(monkeypatch, "encode_image", lambda model, pixels: pixels.shape[0]
                            if torch.is_grad_enabled() and not pixels.requires_grad else 0)
    train(config, progress=False)
    clean_in_loss = load_method(method)["loss"]["ce_on"] == "clean"
    assert sum(in_graph) == IMAGES * (2 if clean_in_loss else 1)  # adversarial images, and clean ones for CE(clean)


def test_clean_logits_are_still_those_of_the_clean_images_when_the_loss_ignores_them(tmp_path, colour_folder,
                                                                                   monkeypatch):
    # With eps 0 the adversarial images are the clean ones: the no-grad clean logits (for clean_acc)
    # must equal the adversarial logits of the graph, step by step.
    config = make_config(tmp_path, colour_folder, method="apt", epochs=1, attack={"eps": 0, "steps": 2})
    received, real_loss = [], capt.train.capt_loss

    def loss_recording_logits(loss_cfg, labels, clean, adv, frozen=None):
        received.append((clean.detach().clone(), adv.detach().clone()))
        return real_loss(loss_cfg, labels, clean, adv, frozen)
    monkeypatch.setattr(capt.train, "capt_loss", loss_recording_logits)
    record = json.loads((train(config, progress=False) / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(received) == IMAGES // config.batch_size
    for clean, adv in received:
        assert torch.allclose(clean, adv, rtol=0, atol=1e-4)
    assert record["clean_acc"] == record["adv_acc"]


def test_the_frozen_clip_sees_each_training_image_once_per_run(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path, colour_folder, epochs=3)
    assert config.loss.needs_frozen
    # CAPT prompts both towers: an image forward without vision prompts is the frozen CLIP's.
    frozen_rows = record_calls(monkeypatch, "encode_image", lambda model, pixels: 0 if model.vision_prompted
                               else pixels.shape[0])
    train(config, progress=False)
    assert sum(frozen_rows) == IMAGES


def test_each_step_gets_the_frozen_predictions_of_its_own_images(tmp_path, colour_folder, monkeypatch):
    # fp32 (make_config's default): bf16's noise (up to 0.06 on an AMX Xeon) is larger than the 5e-3 between two
    # images' frozen logits, so rows could not be told apart
    config = make_config(tmp_path, colour_folder, epochs=2)
    torch.manual_seed(config.seed)
    model = PromptedCLIP(create_clip(config.model, None), config.prompt)
    data = load_dataset(config.data, pixel_transform(model.preprocess_cfg)).few_shot(config.shots, config.seed)
    with torch.no_grad(), model.prompts_disabled():
        images = torch.stack([data.dataset[i][0] for i in range(len(data))])
        expected = model.logits(model.encode_image(images), model.encode_labels(data.classnames))
    distances = torch.cdist(expected, expected) + torch.eye(len(data)) * 1e9
    tolerance = 1e-4  # for float noise between batch groupings; distinct images are >= 5e-3 apart here
    assert distances.min() > 10 * tolerance, "two training images have almost the same frozen logits"

    received, real_loss = [], capt.train.capt_loss

    def loss_recording_frozen_logits(loss_cfg, labels, clean, adv, frozen=None):
        received.append((labels.clone(), frozen.detach().clone()))
        return real_loss(loss_cfg, labels, clean, adv, frozen)
    monkeypatch.setattr(capt.train, "capt_loss", loss_recording_frozen_logits)
    train(config, progress=False)

    labels = torch.cat([step_labels for step_labels, _ in received])
    frozen = torch.cat([step_frozen for _, step_frozen in received])
    nearest = torch.cdist(frozen, expected).min(dim=1)
    assert nearest.values.max() < tolerance  # every row is the frozen prediction of a training image
    assert torch.equal(labels, torch.tensor(data.labels)[nearest.indices])  # of an image with the step's label
    for epoch in range(2):  # and each epoch sees every image once
        assert sorted(nearest.indices[epoch * IMAGES:(epoch + 1) * IMAGES].tolist()) == list(range(IMAGES))


def count_host_reads(monkeypatch) -> list:
    """Calls from capt's own code that read a tensor's values back to Python (a device sync on a GPU)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(CAPT_PACKAGE):
                reads.append(f"{_name} at {caller}:{sys._getframe(1).f_lineno}")
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


def test_host_reads_of_tensors_do_not_grow_with_the_steps_of_an_epoch(tmp_path, colour_folder, monkeypatch):
    reads = count_host_reads(monkeypatch)
    per_run = {}
    for batch_size in (2, 6):  # 6 and 2 steps per epoch
        reads.clear()
        train(make_config(tmp_path / str(batch_size), colour_folder, epochs=2, batch_size=batch_size), progress=False)
        per_run[batch_size] = list(reads)
    assert len(per_run[2]) == len(per_run[6]), per_run
