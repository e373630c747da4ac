import json

import pytest
import torch
from torch.utils.data import TensorDataset

from capt import PromptedCLIP
from capt.cli import main
from capt.data import LabeledDataset, load_dataset
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
    assert table.splitlines() == ["| dataset | n | clean | PGD-100 1/255 |", "|---|---|---|---|", "| pets | 10 | 50.00 | 25.00 |"]


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
