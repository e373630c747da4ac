import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from capt.data.toyworld import Scene, scene_facts
from capt.pretrain import CaptionStream, PretrainConfig, caption_truth, multi_positive_clip_loss, pretrain
from conftest import write_idx_gz


def _features(n, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=generator), dim=-1),
            F.normalize(torch.randn(n, dim, generator=generator), dim=-1))


def test_with_one_positive_each_the_loss_is_open_clips():
    images, texts = _features(6)
    scale = torch.tensor(14.3)
    expected = ClipLoss()(images, texts, scale)
    assert torch.allclose(multi_positive_clip_loss(images, texts, scale, torch.eye(6, dtype=torch.bool)), expected)


def test_multi_positive_loss_by_hand():
    images, texts = _features(3, seed=1)
    truth = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    logits = 10 * images @ texts.T
    log_p_image = logits.log_softmax(1)  # image i over captions
    log_p_text = logits.T.log_softmax(1)  # caption j over images
    image_side = -(0.5 * log_p_image[0, 0] + 0.5 * log_p_image[0, 1] + log_p_image[1, 1] + log_p_image[2, 2]) / 3
    text_side = -(log_p_text[0, 0] + 0.5 * log_p_text[1, 0] + 0.5 * log_p_text[1, 1] + log_p_text[2, 2]) / 3
    loss = multi_positive_clip_loss(images, texts, torch.tensor(10.0), truth)
    assert torch.allclose(loss, (image_side + text_side) / 2)


def test_a_caption_is_true_of_every_image_that_shows_what_it_claims():
    red_star = scene_facts(Scene("star", "red", "small", "plain", 1, "left"))
    blue_star = scene_facts(Scene("star", "blue", "large", "dotted", 1, "top"))
    two_red_stars = scene_facts(Scene("star", "red", "small", "plain", 2, "middle"))
    a_star = frozenset({("shape", "star")})
    a_red_star = frozenset({("shape", "star"), ("colour", "red")})
    two_stars = frozenset({("shape", "star"), ("count", 2)})
    truth = caption_truth([red_star, blue_star, two_red_stars], [a_star, a_red_star, two_stars])
    assert truth.tolist() == [[True, True, False], [True, False, False], [True, True, True]]


def test_fashion_captions_name_their_class_and_claim_only_it(tmp_path):
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.array([7, 7]))  # 7: sneaker
    stream = CaptionStream(PretrainConfig(fashion_root=str(tmp_path), fashion_fraction=1.0), 64)
    pixels, text, facts, claims = stream[3]
    assert pixels.shape == (3, 64, 64) and "sneaker" in text
    assert facts == claims == frozenset({("fashion", 7)})
    toy_facts = CaptionStream(PretrainConfig(fashion_root=None), 64)[3][2]
    assert caption_truth([facts, toy_facts], [claims]).tolist() == [[True], [False]]


def _tiny_config(**overrides):
    # fp32: where the machine offers bf16 (native bf16), auto times both on each new run and two runs compared here
    # could choose differently (tests/test_pretrain.py's auto test covers that path)
    values = dict(model="capt-tiny-vit", steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2, fashion_root=None,
                  data_workers=0, precision="fp32")
    return PretrainConfig(**{**values, **overrides})


def test_an_interrupted_pretraining_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = load_file(pretrain(_tiny_config(), tmp_path / "straight", progress=False))

    original = CaptionStream.__getitem__

    def crash_in_step_three(self, index):
        if index >= 2 * 8:  # the first image of step 3 (batch 8), after the checkpoint of step 2
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(CaptionStream, "__getitem__", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_tiny_config(), tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "weights.safetensors").exists()
    monkeypatch.setattr(CaptionStream, "__getitem__", original)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(_tiny_config(), tmp_path / "resumed", progress=False)
    resumed = load_file(pretrain(_tiny_config(), tmp_path / "resumed", resume=True, progress=False))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    lines = (tmp_path / "resumed" / "pretrain_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="multi_positive"):
        PretrainConfig(loss="triplet")


def test_rendering_in_a_worker_process_trains_the_same_weights(tmp_path):
    in_process = load_file(pretrain(_tiny_config(steps=2), tmp_path / "a", progress=False))
    in_worker = load_file(pretrain(_tiny_config(steps=2, data_workers=1), tmp_path / "b", progress=False))
    for name in in_process:
        assert torch.equal(in_process[name], in_worker[name]), name


def test_gains_biases_and_temperature_are_not_weight_decayed():
    from capt.models import create_clip
    from capt.pretrain import _parameter_groups
    model = create_clip("capt-tiny-vit", None).model
    decayed, kept = _parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert {"logit_scale", "visual.ln_post.weight", "transformer.resblocks.0.attn.in_proj_bias"} <= kept_names
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in {names[id(p)] for p in decayed["params"]}
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert len(decayed["params"]) + len(kept["params"]) == len(list(model.parameters()))


def test_auto_precision_is_timed_once_and_a_resumed_run_keeps_it(tmp_path, monkeypatch, machine_offers_bf16):
    import capt.hardware
    import capt.pretrain
    timed = []

    def fake_timing(step, device):
        step()  # the real step runs; its gradients are dropped
        timed.append(device)
        return "bf16", "bf16 autocast: faster here (test)"
    monkeypatch.setattr(capt.pretrain, "timed_precision", fake_timing)
    original = CaptionStream.__getitem__

    def crash_in_step_three(self, index):
        if index >= 2 * 8:
            raise KeyboardInterrupt
        return original(self, index)
    monkeypatch.setattr(CaptionStream, "__getitem__", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_tiny_config(precision="auto"), tmp_path / "run", progress=False)
    assert timed == ["cpu"]
    assert json.loads((tmp_path / "run" / "pretrain_precision.json").read_text())["precision"] == "bf16"
    monkeypatch.setattr(capt.pretrain, "timed_precision", lambda step, device: ("fp32", "would differ"))
    monkeypatch.setattr(CaptionStream, "__getitem__", original)
    pretrain(_tiny_config(precision="auto"), tmp_path / "run", resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "pretrain_config.json").read_text())["precision_used"] == "bf16"


def test_a_resumed_run_without_the_recorded_choice_keeps_the_rule_it_began_under(tmp_path, monkeypatch, machine_offers_bf16):
    import capt.hardware
    import capt.pretrain
    monkeypatch.setattr(capt.hardware, "recommended_precision", lambda device, hardware=None: "bf16")  # an AMX rule

    def no_timing(step, device):
        raise AssertionError("a resumed run is not timed")
    monkeypatch.setattr(capt.pretrain, "timed_precision", no_timing)
    # began before auto was timed (no pretrain_precision.json): it ran under the rule, and continues so
    assert capt.pretrain._pretrain_precision(_tiny_config(precision="auto"), None, None, tmp_path, resumed=True,
                                             mean=None, std=None) == "bf16"


def test_a_resumed_run_continues_its_recorded_choice_on_a_machine_that_offers_none(tmp_path, monkeypatch):
    """A run timed into bf16, resumed on a CPU without native bf16, continues in bf16 (slowly) rather
    than silently switching to fp32 mid-run."""
    import capt.hardware
    import capt.pretrain
    monkeypatch.setattr(capt.hardware.Hardware, "native_bf16_cpu", property(lambda self: False))
    (tmp_path / capt.pretrain.PRECISION_FILE).write_text(json.dumps({"precision": "bf16", "why": "timed (test)"}))
    assert capt.pretrain._pretrain_precision(_tiny_config(precision="auto"), None, None, tmp_path, resumed=True,
                                             mean=None, std=None) == "bf16"
