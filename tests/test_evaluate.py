import copy
import json
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from capt import PromptedCLIP
from capt.cli import main
from capt.data import LabeledDataset, load_dataset
from capt.attacks.precision import PrecisionError
from capt.evaluate import eps_label, evaluate, markdown_table
from capt.models import pixel_transform


def test_eps_labels():
    assert eps_label(1 / 255) == "1/255"
    assert eps_label(4 / 255) == "4/255"
    assert eps_label(0.01) == "0.01"
    assert eps_label(0.0) == "0/255"


def test_robust_accuracy_is_clean_accuracy_at_zero_eps_and_falls_after(tiny_clip):
    model = PromptedCLIP(tiny_clip)
    classnames = ["red", "green", "blue", "yellow", "black"]
    images = torch.rand(18, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # Label each image with the untuned model's own prediction, so that clean accuracy is 100%.
    with torch.no_grad():
        labels = model.logits(model.encode_image(images), model.encode_labels(classnames)).argmax(-1)
    data = LabeledDataset("noise", TensorDataset(images, labels), classnames, ["a photo of a {}."], labels.tolist())
    result = evaluate(model, data, [0.0, 16 / 255], steps=10, batch_size=7, progress=False)
    assert result["n"] == 18 and result["clean_acc"] == 1.0
    assert result["robust_acc"]["0/255"] == 1.0
    assert result["robust_acc"]["16/255"] < 0.5


def test_max_samples_takes_a_seeded_subset(tiny_clip, colour_folder):
    data = load_dataset(f"imagefolder:{colour_folder}:test", pixel_transform(tiny_clip.preprocess_cfg))
    result = evaluate(PromptedCLIP(tiny_clip), data, [1 / 255], steps=1, max_samples=5, progress=False)
    assert result["n"] == 5


def test_markdown_table():
    table = markdown_table([{"dataset": "pets", "n": 10, "clean_acc": 0.5, "robust_acc": {"1/255": 0.25}, "pgd_steps": 100}])
    assert table.splitlines() == ["| dataset | n | clean | PGD-100 1/255 | gradient masking |", "|---|---|---|---|---|",
                                  "| pets | 10 | 50.00 | 25.00 | not checked (no Square run) |"]


def test_markdown_table_with_several_attacks_gives_each_the_worst_case_and_the_masking_check():
    result = {"dataset": "pets", "n": 200, "clean_acc": 0.5, "attacks": ["pgd", "autoattack", "apgd-t"],
              "budget": {"pgd_steps": 10}, "robust_acc": {"1/255": 0.2},
              "robust_acc_by_attack": {"1/255": {"pgd": 0.3, "autoattack": 0.2, "apgd-t": None}},
              "not_applicable": {"apgd-t": "needs at least 4 classes"},
              "masking": {"1/255": {"checked": True, "fraction": 0.015, "suspected": True}}}
    lines = markdown_table([result]).splitlines()
    assert lines[0] == ("| dataset | n | clean | PGD-10 1/255 | AutoAttack 1/255 | APGD-T 1/255 | worst 1/255 "
                        "| gradient masking |")
    assert lines[2] == "| pets | 200 | 50.00 | 30.00 | 20.00 | n/a | 20.00 | **masking suspected** at 1/255 (1.5% Square only) |"
    assert lines[-1] == "n/a — pets, apgd-t: needs at least 4 classes"
    result["masking"]["1/255"].update(fraction=0.005, suspected=False)
    assert markdown_table([result]).splitlines()[2].endswith("| no (Square only ≤ 0.5%) |")


def test_cli_evaluates_zero_shot_clip(tmp_path, colour_folder):
    out = tmp_path / "zs"
    assert main(["eval", "--method", "zeroshot", "--model", "capt-tiny-vit", "--pretrained", "none",
                 "--data", f"imagefolder:{colour_folder}:test", "--eps", "1/255", "--steps", "2",
                 "--output", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "zeroshot" and saved["results"][0]["n"] == 18


@pytest.mark.parametrize("argv,message", [
    (["eval", "--data", "imagefolder:x"], "give --checkpoint"),
    (["eval", "--method", "capt", "--model", "capt-tiny-vit", "--data", "imagefolder:x"], "needs trained prompts"),
    (["eval", "--checkpoint", "/nonexistent", "--data", "imagefolder:x"], "no prompt checkpoint"),
    (["eval", "--model", "capt-tiny-vit", "--data", "imagefolder:/nonexistent"], "image folder not found"),
    (["eval", "--model", "ViT-B-32", "--pretrained", "openai", "--data", "imagefolder:x"], "local path"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
])
def test_cli_errors_are_messages_not_tracebacks(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("1/255", 1 / 255), ("2.67/255", 2.67 / 255), ("0.5", 0.5)])
def test_eps_parsing(text, value):
    from capt.config import parse_eps
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["nan", "inf", "-1/255", "x", "1/0"])
def test_eps_parsing_refuses(text):
    from capt.config import parse_eps
    with pytest.raises(ValueError):
        parse_eps(text)


def test_cli_refuses_a_bad_eps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "capt-tiny-vit", "--data", "imagefolder:x", "--eps", "nan"])
    assert exit_info.value.code == 2
    assert "invalid parse_eps value: 'nan'" in capsys.readouterr().err


def _labelled_by_own_predictions(model, n=12, size=32, classnames=("red", "green", "blue", "yellow", "black")):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model.logits(model.encode_image(images), model.encode_labels(list(classnames))).argmax(-1)
    return LabeledDataset("noise", TensorDataset(images, labels), list(classnames), ["a photo of a {}."], labels.tolist())


def test_evaluation_under_autocast_is_refused(tiny_clip):
    """A bf16 attack is weaker than the fp32 one (gradients quantised): no figure may come from one.
    Refused, not silently cast, so that the caller learns that the figure would not be what was asked."""
    model = PromptedCLIP(tiny_clip)
    data = _labelled_by_own_predictions(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(PrecisionError, match="autocast is enabled on cpu"):
            evaluate(model, data, [4 / 255], steps=2, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_evaluation_of_a_reduced_precision_model_is_refused(tiny_clip, dtype):
    model = PromptedCLIP(copy.deepcopy(tiny_clip)).to(dtype)
    data = _labelled_by_own_predictions(PromptedCLIP(tiny_clip))
    with pytest.raises(PrecisionError, match=str(dtype)):
        evaluate(model, data, [4 / 255], steps=2, progress=False)


def test_evaluation_of_the_frozen_branch_is_refused(tiny_clip):
    """The figure is the tuned model's: attacking CAPT's frozen CLIP (prompts off) is a known trap."""
    from capt import PromptConfig
    model = PromptedCLIP(tiny_clip, PromptConfig(text_n_ctx=2))
    data = _labelled_by_own_predictions(model)
    with model.prompts_disabled():
        with pytest.raises(ValueError, match="prompts_disabled"):
            evaluate(model, data, [4 / 255], steps=2, progress=False)


class _Threshold(torch.nn.Module):
    """Class 1 if an image's first pixel is over 0.5, else class 0: which images an attack fools is
    then set by hand, exactly."""

    def forward(self, x):
        high = (x.flatten(1)[:, 0] > 0.5).float()
        return torch.stack([1 - high, high], dim=1) * 10


def _fake_attack(fooled_indices):
    """An 'attack' that sets the first pixel of the chosen images to 0 (so they read as class 0)."""
    def factory(classifier, eps, *, n_classes, seed, budget, **_):
        def attack(images, labels):
            adversarial = images.clone()
            adversarial[list(fooled_indices), 0, 0, 0] = 0.0
            return adversarial
        return attack
    return factory


def test_worst_case_and_masking_check_count_each_image_once(monkeypatch):
    from capt.attacks import autoattack
    from capt.evaluate import attack_robustness
    images = torch.ones(10, 1, 1, 1)
    labels = torch.ones(10, dtype=torch.long)
    labels[5] = 0  # misclassified clean
    # "pgd" fools 0 and 1, "square" 1, 2 and 3; both turn the clean-wrong image 5 right
    monkeypatch.setitem(autoattack.EVAL_ATTACKS, "pgd", _fake_attack([0, 1, 5]))
    monkeypatch.setitem(autoattack.EVAL_ATTACKS, "square", _fake_attack([1, 2, 3, 5]))
    result = attack_robustness(_Threshold(), [(images, labels)], 2, [1 / 255], attacks=["pgd", "square"], progress=False)
    assert result["clean_acc"] == 0.9
    # per attack: the accuracy on the attack's images (image 5 counts, as it always did for the PGD figures)
    assert result["robust_acc_by_attack"]["1/255"] == {"pgd": 0.8, "square": 0.7}
    # worst case: right clean (the clean image is in the ball) and under both, i.e. 4, 6, 7, 8, 9
    assert result["robust_acc"]["1/255"] == 0.5
    masking = result["masking"]["1/255"]
    assert masking["checked"] and masking["black_box_only"] == 2 and masking["fraction"] == 0.2 and masking["suspected"]
    low, high = result["robust_ci95"]["1/255"]
    assert low < 0.5 < high


@pytest.mark.parametrize("square_only,suspected", [(0, False), (2, False), (3, True)])
def test_masking_is_suspected_above_one_percent(square_only, suspected):
    from capt.evaluate import masking_check
    n = 200
    white = torch.zeros(n, dtype=torch.bool)
    white[:50] = True
    square = white.clone()
    square[50:50 + square_only] = True
    check = masking_check({"apgd-ce": white, "square": square}, n)
    assert check["checked"] and check["black_box_only"] == square_only and check["suspected"] is suspected


def test_masking_is_not_checked_without_square():
    from capt.evaluate import masking_check
    check = masking_check({"pgd": torch.ones(4, dtype=torch.bool)}, 4)
    assert not check["checked"] and not check["suspected"] and "square" in check["reason"]


def test_cli_runs_several_attacks_and_writes_each_with_the_worst_case(tmp_path, colour_folder):
    out = tmp_path / "attacks"
    assert main(["eval", "--model", "capt-tiny-vit", "--pretrained", "none", "--data", f"imagefolder:{colour_folder}:test",
                 "--eps", "4/255", "--steps", "2", "--attack", "pgd", "--attack", "apgd-ce", "--output", str(out),
                 "--no-progress"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["attacks"] == ["pgd", "apgd-ce"]
    [result] = saved["results"]
    by_attack = result["robust_acc_by_attack"]["4/255"]
    assert set(by_attack) == {"pgd", "apgd-ce"}
    assert result["robust_acc"]["4/255"] <= min(by_attack.values())
    assert result["masking"]["4/255"]["checked"] is False
    header = (out / "results.md").read_text().splitlines()[0]
    assert "PGD-2 4/255" in header and "APGD-CE 4/255" in header and "worst 4/255" in header


def test_cli_default_attack_is_pgd(tmp_path, colour_folder):
    out = tmp_path / "default"
    assert main(["eval", "--model", "capt-tiny-vit", "--pretrained", "none", "--data", f"imagefolder:{colour_folder}:test",
                 "--eps", "1/255", "--steps", "1", "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["results"][0]["attacks"] == ["pgd"]


def test_cli_refuses_an_unknown_attack(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "capt-tiny-vit", "--data", "imagefolder:x", "--attack", "pgd", "cw"])
    assert exit_info.value.code == 2
    assert "argument --attack: invalid choice: 'cw'" in capsys.readouterr().err


def test_cli_says_how_to_install_torchattacks_when_it_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    assert main(["eval", "--model", "capt-tiny-vit", "--data", "imagefolder:x", "--attack", "autoattack"]) == 2
    assert "pip install --no-deps torchattacks==3.5.1 scipy" in capsys.readouterr().err
