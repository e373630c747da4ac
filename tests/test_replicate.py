import dataclasses
import json

import pytest

from capt import replicate
from capt.checkpoint import LATEST_FILE
from capt.config import TrainConfig
from capt.replicate import GridConfig, run_dir_for, run_grid, summary_table


def test_a_small_grid_writes_json_table_and_plots(tmp_path, colour_folder):
    grid = GridConfig(model="capt-tiny-vit", pretrained="none", methods=["zeroshot", "fap", "capt"], shots=[1],
                      eps=[1 / 255], seeds=[1, 2], epochs=1, batch_size=4,
                      train_data=f"imagefolder:{colour_folder}:train",
                      eval_data=[f"imagefolder:{colour_folder}:test", f"imagefolder:{colour_folder}:train"],
                      eval_samples=6, pgd_steps=2, steps=None, workers=1, device="cpu")
    rows = run_grid(grid, tmp_path)
    # every method once per seed (zero-shot too: each seed evaluates its own images), on 2 datasets each
    assert len(rows) == 2 * 3 * 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    table = (tmp_path / "results.md").read_text().split("\n\n")[0].splitlines()  # the grid's table comes first
    assert len(table) == 2 + 3 and "±" in table[-1]  # header, rule, one line per method; seeds give a std
    assert (tmp_path / "clean_vs_robust.png").stat().st_size > 0 and (tmp_path / "robust_vs_eps.png").stat().st_size > 0


def test_summary_table_means_and_cross_dataset():
    rows = [{"method": "capt", "shots": 4, "eps": "4/255", "seed": s, "dataset": d, "in_distribution": d == "a",
             "clean": c, "robust": r} for s, d, c, r in [(1, "a", 0.5, 0.2), (2, "a", 0.7, 0.4),
                                                        (1, "b", 0.3, 0.1), (2, "b", 0.5, 0.3)]]
    line = summary_table(rows).splitlines()[-1]
    assert "| 60.0 ± 14.1 / 30.0 ± 14.1 |" in line  # in-distribution, mean ± sample std
    assert line.endswith("| 40.0 ± 14.1 / 20.0 ± 14.1 |")  # cross-dataset = the other set here


def _config(**overrides):
    values = {"model": "capt-tiny-vit", "pretrained": "none", "method": "capt", "data": "imagefolder:data:train",
              "shots": 1, "seed": 1, "epochs": 1, "batch_size": 4, "lr": 0.05,
              "attack": {"eps": 1 / 255, "alpha": 1 / 255, "steps": 2}, **overrides}
    return TrainConfig.from_dict(values)


@pytest.mark.parametrize("a, b", [
    ({"lr": 0.05}, {"lr": 0.1}),
    ({"batch_size": 4}, {"batch_size": 8}),
    ({"pretrained": "none"}, {"pretrained": "models/capt-toy/weights.safetensors"}),
    ({"model": "capt-tiny-vit"}, {"model": "capt-toy-vit"}),
    ({"data": "imagefolder:data:train"}, {"data": "imagefolder:other:train"}),
    # round(eps * 255) named both of these "eps2", and 0.5/255 "eps0" like eps 0
    ({"attack": {"eps": 1.5 / 255, "alpha": 1 / 255}}, {"attack": {"eps": 2 / 255, "alpha": 1 / 255}}),
    ({"attack": {"eps": 0.5 / 255, "alpha": 1 / 255}}, {"attack": {"eps": 0.0, "alpha": 1 / 255}}),
])
def test_runs_that_train_differently_get_different_folders(tmp_path, a, b):
    assert run_dir_for(_config(**a), tmp_path) != run_dir_for(_config(**b), tmp_path)


def test_a_run_folder_is_readable_and_ignores_what_does_not_change_the_result(tmp_path):
    folder = run_dir_for(_config(attack={"eps": 4 / 255, "alpha": 2 / 255}), tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("capt-1shot-eps4_255-seed1-")
    moved = _config(attack={"eps": 4 / 255, "alpha": 2 / 255}, output_dir="elsewhere", num_workers=3, device="cpu",
                    keep_checkpoints=5)
    assert run_dir_for(moved, tmp_path) == folder


def test_a_finished_run_is_reused_an_unfinished_one_resumed_and_a_changed_grid_trains_anew(
        tmp_path, colour_folder, monkeypatch):
    grid = GridConfig(model="capt-tiny-vit", pretrained="none", methods=["capt"], shots=[1], eps=[1 / 255], seeds=[1],
                      epochs=2, batch_size=4, lr=0.05, train_data=f"imagefolder:{colour_folder}:train",
                      eval_data=[f"imagefolder:{colour_folder}:test"], eval_samples=3, pgd_steps=1, steps=None, workers=1,
                      device="cpu")
    train = replicate.train
    # An interruption after the first epoch.
    monkeypatch.setattr(replicate, "train", lambda config, **kw: train(config, stop_after_epoch=1, **kw))
    run_grid(grid, tmp_path)
    monkeypatch.setattr(replicate, "train", train)
    [run_dir] = (tmp_path / "runs").iterdir()

    def stamp(epoch):
        stat = (run_dir / f"epoch_{epoch:03d}" / "prompts.safetensors").stat()
        return stat.st_ino, stat.st_mtime_ns

    first = stamp(1)
    run_grid(grid, tmp_path)  # resumed: epoch 2 trained, epoch 1 kept
    assert (run_dir / LATEST_FILE).read_text().strip() == "epoch_002" and stamp(1) == first
    second = stamp(2)
    run_grid(grid, tmp_path)  # finished: nothing trained
    assert stamp(2) == second and stamp(1) == first
    run_grid(dataclasses.replace(grid, lr=0.1), tmp_path)  # was read from the lr 0.05 run before
    assert len(list((tmp_path / "runs").iterdir())) == 2 and stamp(2) == second
