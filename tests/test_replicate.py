import json

from capt.replicate import GridConfig, run_grid, summary_table


def test_a_small_grid_writes_json_table_and_plots(tmp_path, colour_folder):
    grid = GridConfig(model="capt-tiny-vit", pretrained="none", methods=["zeroshot", "fap", "capt"], shots=[1],
                      eps=[1 / 255], seeds=[1, 2], epochs=1, batch_size=4,
                      train_data=f"imagefolder:{colour_folder}:train",
                      eval_data=[f"imagefolder:{colour_folder}:test", f"imagefolder:{colour_folder}:train"],
                      eval_samples=6, pgd_steps=2, device="cpu")
    rows = run_grid(grid, tmp_path)
    # zero-shot once (it depends on no seed), the two trained methods once per seed, on 2 datasets each
    assert len(rows) == 2 * (1 + 2 * 2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + 3 and "±" in table[-1]  # header, rule, one line per method; seeds give a std
    assert (tmp_path / "clean_vs_robust.png").stat().st_size > 0 and (tmp_path / "robust_vs_eps.png").stat().st_size > 0


def test_summary_table_means_and_cross_dataset():
    rows = [{"method": "capt", "shots": 4, "eps": "4/255", "seed": s, "dataset": d, "in_distribution": d == "a",
             "clean": c, "robust": r} for s, d, c, r in [(1, "a", 0.5, 0.2), (2, "a", 0.7, 0.4),
                                                        (1, "b", 0.3, 0.1), (2, "b", 0.5, 0.3)]]
    line = summary_table(rows).splitlines()[-1]
    assert "| 60.0 ± 14.1 / 30.0 ± 14.1 |" in line  # in-distribution, mean ± sample std
    assert line.endswith("| 40.0 ± 14.1 / 20.0 ± 14.1 |")  # cross-dataset = the other set here
