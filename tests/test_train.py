import json
import warnings

import pytest
import torch
import yaml

from capt.checkpoint import load_prompted_model, read_checkpoint, resolve_checkpoint
from capt.cli import main
from capt.config import AttackConfig, TrainConfig, list_methods, load_method, parse_eps
from capt.train import train

TRAINABLE = [m for m in list_methods() if load_method(m).get("trainable", True)]


def make_config(tmp_path, colour_folder, **overrides):
    """A small training run. fp32 unless overridden: where the CPU offers bf16 (native bf16), auto times a step
    each way first, so two runs compared by a test could choose differently, and call-counting tests
    would count the timing (tests/test_precision_option.py tests auto)."""
    values = {"model": "capt-tiny-vit", "pretrained": "none", "method": "capt", "precision": "fp32",
              "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"},
              "shots": 4, "epochs": 3, "batch_size": 4, "warmup_epochs": 1, "lr": 0.05,
              "attack": {"eps": "2/255", "alpha": "1/255", "steps": 2},
              "output_dir": str(tmp_path / "run"), **overrides}
    return TrainConfig.from_dict(values)


def prompts_of(run_dir):
    return read_checkpoint(run_dir)[1]


def test_every_baseline_is_a_config_of_the_same_trainer():
    assert set(list_methods()) == {"zeroshot", "apt", "advvp", "advmaple", "fap", "capt", "tecoa"}
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig.from_dict({"method": "zeroshot"})


@pytest.mark.parametrize("eps, steps", [("1/255", 2), ("4/255", 2), ("4/255", 3), ("8/255", 10)])
def test_default_attack_step_scales_with_eps_and_steps(eps, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default step size must never trigger the reach warning
        attack = AttackConfig.from_dict({"eps": eps, "steps": steps})
    assert attack.alpha == pytest.approx(2 * parse_eps(eps) / steps, rel=1e-12)


def test_explicit_attack_step_is_kept_absolute_or_relative_to_eps():
    assert AttackConfig.from_dict({"eps": "4/255", "alpha": "1/255", "steps": 8}).alpha == pytest.approx(1 / 255)
    assert AttackConfig.from_dict({"eps": "3/255", "alpha": "eps/1.5", "steps": 3}).alpha == pytest.approx(2 / 255)
    assert AttackConfig.from_dict({"eps": "4/255", "alpha": "0.5*eps", "steps": 4}).alpha == pytest.approx(2 / 255)
    with pytest.raises(ValueError, match="relative to eps"):
        AttackConfig.from_dict({"eps": "4/255", "alpha": "eps*2"})


@pytest.mark.parametrize("eps, alpha, steps, warns", [
    ("4/255", "1/255", 2, True),      # 2/255 of travel in a 4/255 ball
    ("4/255", "1/255", 3, True),
    ("4/255", "1/255", 4, False),     # exactly reaches the edge
    ("4/255", "2.67/255", 3, False),
    ("3/255", "eps/3", 3, False),     # eps / 3 * 3 may round below eps: no warning for that
    ("1/255", "1/255", 0, False),     # no steps: no attack, nothing to reach
    (0, "1/255", 2, False),
])
def test_an_attack_that_cannot_reach_the_edge_of_its_ball_warns(eps, alpha, steps, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AttackConfig.from_dict({"eps": eps, "alpha": alpha, "steps": steps})
    reach = [w for w in caught if issubclass(w.category, UserWarning) and "cannot reach" in str(w.message)]
    assert len(reach) == (1 if warns else 0)


def test_the_run_records_the_resolved_attack_step(tmp_path, colour_folder):
    config = make_config(tmp_path, colour_folder, epochs=1, attack={"eps": "4/255", "steps": 4})
    run_dir = train(config, progress=False)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["attack"]
    assert saved["alpha"] == config.attack.alpha == pytest.approx(2 / 255, rel=1e-12)
    assert read_checkpoint(run_dir)[0]["attack"]["alpha"] == saved["alpha"]


@pytest.mark.parametrize("method", TRAINABLE)
def test_each_method_trains_and_writes_a_checkpoint(tmp_path, colour_folder, method):
    config = make_config(tmp_path, colour_folder, method=method, epochs=1)
    initial = {k: v.clone() for k, v in _initial_prompts(config).items()}
    run_dir = train(config, progress=False)
    meta, state = read_checkpoint(run_dir)
    assert meta["method"] == method and meta["epoch"] == 1 and meta["classnames"] == ["blue", "green", "red"]
    assert set(state) == set(initial)
    assert any(not torch.equal(state[k], initial[k]) for k in state), "training changed no prompt"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["images"] == 12 and 0 <= record["clean_acc"] <= 1 and 0 <= record["adv_acc"] <= 1
    assert record["loss"] > 0


def _initial_prompts(config):
    from capt import PromptedCLIP, create_clip
    torch.manual_seed(config.seed)
    return PromptedCLIP(create_clip(config.model, None), config.prompt).prompt_state_dict()


def test_resumed_run_ends_with_the_same_prompts(tmp_path, colour_folder):
    straight = train(make_config(tmp_path / "a", colour_folder), progress=False)
    interrupted = make_config(tmp_path / "b", colour_folder)
    train(interrupted, stop_after_epoch=1, progress=False)
    assert read_checkpoint(interrupted.output_dir)[0]["epoch"] == 1
    train(interrupted, resume=True, progress=False)
    expected, got = prompts_of(straight), prompts_of(interrupted.output_dir)
    assert read_checkpoint(interrupted.output_dir)[0]["epoch"] == 3
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    first = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(l) for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in first] == [r["loss"] for r in second]


def test_existing_run_is_never_overwritten_and_resume_must_not_change_the_config(tmp_path, colour_folder):
    config = make_config(tmp_path, colour_folder, epochs=1)
    train(config, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(make_config(tmp_path, colour_folder, epochs=1, lr=0.1), resume=True, progress=False)


def test_a_crash_while_saving_leaves_the_last_checkpoint_intact(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path, colour_folder, epochs=2)
    train(config, stop_after_epoch=1, progress=False)
    before = prompts_of(config.output_dir)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("capt.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        train(config, resume=True, progress=False)
    monkeypatch.undo()
    assert resolve_checkpoint(config.output_dir).name == "epoch_001"
    after = prompts_of(config.output_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)
    train(config, resume=True, progress=False)  # and the run still completes
    assert resolve_checkpoint(config.output_dir).name == "epoch_002"


def test_old_checkpoints_are_pruned(tmp_path, colour_folder):
    config = make_config(tmp_path, colour_folder, epochs=3, keep_checkpoints=2)
    run_dir = train(config, progress=False)
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_002", "epoch_003"]


def test_cli_train_then_eval(tmp_path, colour_folder, capsys):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": "capt-tiny-vit", "pretrained": "none", "method": "capt", "shots": 4, "epochs": 1, "batch_size": 6,
        "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"},
        "output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    model, meta = load_prompted_model(tmp_path / "run")
    assert meta["model"] == "capt-tiny-vit" and model.config.text_n_ctx == 2
    out = tmp_path / "results"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", f"imagefolder:{colour_folder}:test",
                 "--data", f"imagefolder:{colour_folder}:train", "--eps", "1/255", "4/255", "--steps", "3",
                 "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["n"] for r in results["results"]] == [18, 18]
    assert set(results["results"][0]["robust_acc"]) == {"1/255", "4/255"}
    table = (out / "results.md").read_text()
    assert "PGD-3 4/255" in table and table.count("\n") == 4
