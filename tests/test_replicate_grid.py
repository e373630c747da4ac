"""The full replication grid's plan (headline cells, ablations, step counts), its parallel workers,
its shared random weights and its statistics, against hand computations."""
import json
import math

import pytest

from capt import replicate
from capt.replicate import ABLATIONS, Cell, GridConfig, epochs_for, plan, pooled_interval, run_grid

TOY_SIZES = {1: 51, 4: 204, 16: 816}  # 51 seen pairs of the toy world, 1 / 4 / 16 images each
TIMING_KEYS = {"train_seconds", "step_seconds", "peak_rss_mb", "peak_rss_before_mb", "attack_seconds"}
# The run folder's name hashes the weights' path, which is inside each grid's own output folder.
# Which cell a worker runs first (and so whose peak memory is its own) is the pool's scheduling.
# alpha_by_epoch is compared apart, approximately: the workers' threads differ from one process's.
NOT_COMPARED = TIMING_KEYS | {"run", "first_in_process", "alpha_by_epoch"}


@pytest.mark.parametrize("steps, images, batch, epochs", [
    (30, 51, 32, 15),   # 2 steps an epoch
    (30, 204, 32, 5),   # 7 steps an epoch: 35 steps
    (30, 816, 32, 2),   # 26 steps an epoch: 2 epochs, never 1 (the first epoch is the warm-up)
    (1, 10, 32, 2),
])
def test_epochs_give_at_least_the_steps_and_two_epochs(steps, images, batch, epochs):
    assert epochs_for(steps, images, batch) == epochs
    assert epochs * math.ceil(images / batch) >= steps


def test_the_full_plan_has_every_method_shot_eps_and_seed_and_the_extras_only_on_the_headline():
    grid = GridConfig()
    cells = plan(grid, TOY_SIZES, replicate.TOY_EVAL)
    grid_cells = [c for c in cells if c.part == "grid"]
    trained = [c for c in grid_cells if c.method != "zeroshot"]
    assert len(trained) == 5 * 3 * 3 * 3
    assert len([c for c in grid_cells if c.method == "zeroshot"]) == 3 * 3  # every eps and seed, no shots
    assert {(c.name, c.seed) for c in cells if c.part == "ablation"} == {(a, s) for a in ABLATIONS for s in (1, 2, 3)}
    for cell in cells:
        parts = [e.part for e in cell.evaluations]
        assert parts[:5] == ["grid"] * 5  # in-distribution, then the four cross-dataset sets
        headline = cell.part == "grid" and cell.shots in (None, 16) and math.isclose(cell.eps, 2 / 255)
        assert ("headline" in parts) == headline and ("eps_curve" in parts) == headline
        autoattack = [e for e in cell.evaluations if "autoattack" in e.attacks]
        assert bool(autoattack) == (headline and cell.name in ("zeroshot", "capt") and cell.seed == 1)
    assert all(c.shots == 16 and math.isclose(c.eps, 2 / 255) for c in cells if c.part == "ablation")


def test_no_headline_and_no_ablations_when_the_grid_does_not_train_at_the_headline_eps():
    cells = plan(GridConfig(eps=[1 / 255]), TOY_SIZES, replicate.TOY_EVAL)
    assert {c.part for c in cells} == {"grid"}
    assert all(e.part == "grid" for c in cells for e in c.evaluations)


def test_ablations_run_at_each_eps_asked_for_that_the_grid_trains_at():
    cells = plan(GridConfig(ablation_at=[2 / 255, 4 / 255, 8 / 255]), TOY_SIZES, replicate.TOY_EVAL)
    ablation = [c for c in cells if c.part == "ablation"]
    assert len(ablation) == len(ABLATIONS) * 3 * 2  # 8/255 is not among the grid's eps
    assert {round(c.eps * 255) for c in ablation} == {2, 4}
    assert all("headline" not in [e.part for e in c.evaluations] for c in ablation)


def test_an_ablation_trains_the_method_with_its_sections_overridden(tmp_path):
    grid = GridConfig()
    configs = {name: Cell(name, spec["method"], 16, 2 / 255, 1, "ablation",
                          {k: v for k, v in spec.items() if k != "method"}, 2).train_config(grid, tmp_path)
               for name, spec in ABLATIONS.items()}
    full = Cell("capt", "capt", 16, 2 / 255, 1, "grid", epochs=2).train_config(grid, tmp_path)
    assert configs["capt/ce-only"].loss.lam == 0 and full.loss.lam == 1.5
    assert not configs["capt/no-trades"].loss.trades and configs["capt/no-trades"].loss.consistency
    assert not configs["capt/no-consistency"].loss.consistency and configs["capt/no-consistency"].loss.trades
    assert configs["capt/alpha-hard"].loss.alpha_mode == "hard"
    assert configs["capt/independent"].prompt.coupling == "independent" and full.prompt.coupling == "maple"
    # every variant trains the rest as CAPT does, in a folder of its own
    assert all(c.prompt.text_depth == full.prompt.text_depth and c.attack == full.attack for c in configs.values())
    assert len({c.output_dir for c in configs.values()} | {full.output_dir}) == len(configs) + 1
    # on the default robust backbone, the consistency term points at the original CLIP
    assert full.reference_pretrained == "models/capt-toy/weights.safetensors"


def test_the_pooled_interval_is_wilsons_on_the_images_of_every_seed():
    rows = [{"robust": 0.20, "n": 100}, {"robust": 0.30, "n": 100}]
    p, n, z = 50 / 200, 200, 1.959964  # by hand: Wilson's score interval
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert pooled_interval(rows) == [round(100 * (centre - half), 1), round(100 * (centre + half), 1)]


def _tiny_grid(colour_folder, **overrides):
    values = dict(model="capt-tiny-vit", pretrained="none", methods=["zeroshot", "capt"], shots=[2], eps=[2 / 255],
                  seeds=[1, 2], steps=None, epochs=2, batch_size=4, train_data=f"imagefolder:{colour_folder}:train",
                  eval_data=[f"imagefolder:{colour_folder}:test", f"imagefolder:{colour_folder}:train"],
                  eval_samples=6, cross_samples=4, pgd_steps=2, headline_eps=[2 / 255], headline_pgd_steps=3,
                  headline_samples=6, headline_autoattack_methods=[], eps_curve=[1 / 255, 4 / 255], eps_curve_samples=4,
                  ablations=["capt/alpha-hard"], workers=1, device="cpu")
    values.update(overrides)
    return GridConfig(**values)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows]


def test_two_workers_give_the_rows_of_one_and_a_second_call_reuses_every_cell(tmp_path, colour_folder):
    one = run_grid(_tiny_grid(colour_folder), tmp_path / "one")
    two = run_grid(_tiny_grid(colour_folder, workers=2), tmp_path / "two")
    assert _without_timing(one) == _without_timing(two)
    for first_row, second_row in zip(one, two):
        assert first_row.get("alpha_by_epoch", []) == pytest.approx(second_row.get("alpha_by_epoch", []), abs=1e-6)
    assert {r["part"] for r in one} == {"grid", "headline", "eps_curve", "ablation"}
    # both drew the same random network, once, and trained and evaluated on it
    first, second = (p / "random-weights-capt-tiny-vit-seed1.safetensors" for p in (tmp_path / "one", tmp_path / "two"))
    assert first.read_bytes() == second.read_bytes()
    for config in (tmp_path / "one" / "runs").glob("*/config.yaml"):
        assert str(first.resolve()) in config.read_text()
    again = run_grid(_tiny_grid(colour_folder), tmp_path / "one")
    timing = json.loads((tmp_path / "one" / "results.json").read_text())["timing"]
    assert timing["cells_run_this_call"] == 0 and _without_timing(again) == _without_timing(one)
    report = (tmp_path / "one" / "results.md").read_text()
    for section in ("### Headline cells", "### Robust accuracy against eps", "### Ablations", "### CAPT's adaptive weight",
                    "### Training cost"):
        assert section in report
    for plot in ("clean_vs_robust.png", "robust_vs_eps.png", "ablations.png", "alpha.png"):
        assert (tmp_path / "one" / plot).stat().st_size > 0


def test_the_alpha_report_agrees_with_the_alpha_the_trainer_logged(tmp_path, colour_folder):
    """Two independent computations of CAPT's soft alpha: the trainer's per-epoch mean (capt.losses, on
    cached frozen features in shuffled batches) and the report's (a fresh forward of the training images)."""
    run_grid(_tiny_grid(colour_folder, methods=["capt"], seeds=[1], ablations=[], eps_curve=[]), tmp_path)
    alpha = json.loads((tmp_path / "alpha.json").read_text())
    [run] = alpha["by_epoch"]
    values = alpha["by_seed"]["1"]["values"]
    assert all(0.0 <= v <= 1.0 for v in values) and len(values) == 2 * 3  # 2 shots x 3 colours
    for epoch_mean in run["alpha_by_epoch"]:
        assert epoch_mean == pytest.approx(sum(values) / len(values), abs=1e-4)


def test_unknown_ablations_and_methods_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="unknown ablation"):
        GridConfig(ablations=["capt/no-such-thing"])
    with pytest.raises(ValueError, match="unknown method"):
        GridConfig(methods=["capt", "maple++"])
    with pytest.raises(ValueError, match="workers"):
        GridConfig(workers=0)


def test_eval_templates_replace_each_datasets_own_and_bad_ones_are_refused(tmp_path, colour_folder):
    rows = run_grid(_tiny_grid(colour_folder, methods=["zeroshot"], seeds=[1], eval_templates=["a photo of the {}."],
                               headline_eps=[]), tmp_path)
    assert rows and all(r["part"] == "grid" for r in rows)
    with pytest.raises(ValueError):
        GridConfig(eval_templates=["no field here"])


def test_a_dry_run_grid_stops_every_run_at_max_steps_with_checkpointed_blocks(tmp_path, colour_folder):
    rows = run_grid(_tiny_grid(colour_folder, methods=["capt"], seeds=[1], epochs=3, max_steps=1,
                               grad_checkpointing=True, ablations=[], headline_eps=[]), tmp_path)
    assert rows and all(r["steps"] == 1 for r in rows)
    assert not (tmp_path / "alpha.json").exists()  # one step says nothing of alpha
    assert "| capt | 2 | 1 |" in (tmp_path / "results.md").read_text()
