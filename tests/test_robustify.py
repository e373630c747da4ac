"""``capt robustify`` (FARE): the embedding attack, the fine-tuning it drives, what it writes, and
resuming to the same weights."""
import json

import pytest
import torch
from safetensors.torch import load_file

from capt import PromptedCLIP, create_clip
from capt.attacks.embedding import EmbeddingPGD, embedding_distance
from capt.cli import main
from capt.prompts import PromptConfig
from capt.robustify import CURVE_FILE, METRICS_FILE, RobustifyConfig, robustify


def _config(colour_folder, **overrides):
    values = {"model": "capt-tiny-vit", "pretrained": "none", "data": f"imagefolder:{colour_folder}:train",
              "steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "eps": "8/255", "attack_steps": 2,
              "checkpoint_every": 2, "eval_every": 3, "eval_data": f"imagefolder:{colour_folder}:test",
              "eval_samples": 6, "eval_eps": ["4/255"], "eval_pgd_steps": 2, **overrides}
    return RobustifyConfig.from_dict(values)


def test_the_embedding_attack_moves_embeddings_further_than_random_noise_of_its_size():
    torch.manual_seed(0)
    model = PromptedCLIP(create_clip("capt-tiny-vit"), PromptConfig())
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        clean = model.encode_image(images)
    eps = 8 / 255
    adversarial = EmbeddingPGD(model.encode_image, eps, alpha=eps / 2, steps=5, seed=0)(images, targets=clean)
    noise = (images + eps * torch.randn_like(images).sign()).clamp(0, 1)
    with torch.no_grad():
        attacked, noisy = embedding_distance(model.encode_image(adversarial), clean), embedding_distance(model.encode_image(noise), clean)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert attacked.mean() > 2 * noisy.mean() > 0


def test_robustify_tunes_only_the_image_tower_and_writes_a_loadable_backbone(tmp_path, colour_folder):
    config = _config(colour_folder)
    weights = robustify(config, tmp_path / "run", progress=False)
    torch.manual_seed(config.seed)
    original = create_clip("capt-tiny-vit").model.state_dict()
    tuned = load_file(weights)
    changed = {k for k in original if not torch.allclose(tuned[k].float(), original[k].float(), atol=1e-3)}
    assert changed and all(k.startswith("visual.") for k in changed)
    loaded = create_clip("capt-tiny-vit", str(weights))  # an ordinary pretrained: file
    assert torch.equal(loaded.model.visual.conv1.weight, tuned["visual.conv1.weight"].float())
    metrics = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6] and all(m["adv_distance"] > 0 for m in metrics)
    curve = [json.loads(line) for line in (tmp_path / "run" / CURVE_FILE).read_text().splitlines()]
    assert [p["step"] for p in curve] == [0, 3, 6] and set(curve[0]["robust_acc"]) == {"4/255"}


def test_robustify_lowers_the_adversarial_embedding_distance_it_trains_on(tmp_path, colour_folder):
    config = _config(colour_folder, steps=30, lr=3e-3, eval_every=0, checkpoint_every=10)
    robustify(config, tmp_path / "run", progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert metrics[-1]["adv_distance"] < 0.8 * metrics[0]["adv_distance"]


def test_an_interrupted_robustify_resumes_to_the_same_weights(tmp_path, colour_folder):
    config = _config(colour_folder, eval_every=0, clean_weight=0.5)
    straight = load_file(robustify(config, tmp_path / "a", progress=False))
    assert robustify(config, tmp_path / "b", progress=False, stop_after=3) is None
    with pytest.raises(FileExistsError, match="--resume"):
        robustify(config, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="lr"):
        robustify(_config(colour_folder, eval_every=0, clean_weight=0.5, lr=1.0), tmp_path / "b", resume=True,
                  progress=False)
    resumed = load_file(robustify(config, tmp_path / "b", resume=True, progress=False))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_robustify_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown robustify config key"):
        RobustifyConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match="eps"):
        RobustifyConfig.from_dict({"eps": "-1/255"})


def test_the_cli_runs_robustify(tmp_path, colour_folder, capsys):
    assert main(["robustify", "--output", str(tmp_path / "run"), "--model", "capt-tiny-vit", "--pretrained", "none",
                 "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--no-progress",
                 "--config", str(_write_yaml(tmp_path, {"data": f"imagefolder:{colour_folder}:train"}))]) == 0
    assert "robust image tower in" in capsys.readouterr().out
    assert main(["robustify", "--output", str(tmp_path / "run"), "--pretrained", "none", "--steps", "2"]) == 2


def _write_yaml(tmp_path, values):
    import yaml
    path = tmp_path / "robustify.yaml"
    path.write_text(yaml.safe_dump(values))
    return path
