"""``capt promote``: a run's prompts become the embedded default, only if their base weights are a
file inside the repository (the default model must be self-contained)."""
import json

import torch

from capt import PromptedCLIP, create_clip, default_model
from capt.checkpoint import save_checkpoint
from capt.cli import main
from capt.prompts import PromptConfig


def _run_on(tmp_path, pretrained):
    torch.manual_seed(0)
    clip = create_clip("capt-toy-vit", pretrained)
    model = PromptedCLIP(clip, PromptConfig(text_n_ctx=2, vision_n_ctx=2, coupling="maple"))
    save_checkpoint(tmp_path / "run", 1, model, {"method": "capt", "classnames": ["a", "b"]})
    return tmp_path / "run"


def test_promote_copies_the_prompts_and_records_the_base_relative_to_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(default_model, "PROMPTS", tmp_path / "default-prompts")
    run = _run_on(tmp_path, str(default_model.WEIGHTS.resolve()))
    assert main(["promote", str(run)]) == 0
    assert "are now those of" in capsys.readouterr().out
    meta = json.loads((tmp_path / "default-prompts" / "prompt_config.json").read_text())
    assert meta["pretrained"] == default_model.relative(default_model.WEIGHTS)


def test_promote_refuses_prompts_on_weights_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(default_model, "PROMPTS", tmp_path / "default-prompts")
    assert main(["promote", str(_run_on(tmp_path, "none"))]) == 2
    assert "inside the repository" in capsys.readouterr().err
    assert not (tmp_path / "default-prompts").exists()
