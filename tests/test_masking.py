"""The gradient-masking check (capt/evaluate.py): a model whose gradient is useless but whose decision is
not robust fools PGD into calling it robust; the black-box Square attack finds its adversarial examples
and the results say "masking suspected". A normal model is not flagged."""
import pytest
import torch
from torch import nn

from capt import PromptedCLIP, ZeroShotClassifier
from capt.attacks.autoattack import AttackBudget
from capt.evaluate import attack_robustness, eps_label, markdown_table
from capt.replicate import summary_table

LABELS = ["red", "green", "blue", "yellow", "black"]
# Large enough that Square fools most images within its small query budget (the random tiny model).
EPS = 16 / 255
BUDGET = AttackBudget(pgd_steps=10, apgd_steps=10, fab_steps=10, square_queries=300, n_target_classes=2)


class QuantisedInput(nn.Module):
    """A classifier behind the quantising step ``round(x·4)/4``: its gradient is zero almost everywhere
    ("shattered gradients", Athalye et al., arXiv:1802.00420), so a gradient attack goes nowhere from its
    random start, while the decision moves as easily as the classifier's whenever a pixel crosses a level."""

    def __init__(self, classifier: nn.Module, levels: int = 4):
        super().__init__()
        self.classifier = classifier
        self.levels = levels

    def forward(self, x):
        return self.classifier(torch.round(x * self.levels) / self.levels)


@pytest.fixture(scope="module")
def classifier(tiny_clip):
    model = PromptedCLIP(tiny_clip)
    with torch.no_grad():
        return ZeroShotClassifier(model, model.encode_labels(LABELS)).eval()


def _run(model, attacks, n=24):
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(images).argmax(-1)  # clean accuracy 100%: every image can be attacked
    return attack_robustness(model, [(images, labels)], len(LABELS), [EPS], attacks=attacks, budget=BUDGET,
                             progress=False)


def test_pgd_alone_calls_a_masked_model_robust_and_square_flags_it(classifier):
    result = _run(QuantisedInput(classifier), ["pgd", "square"])
    by_attack = result["robust_acc_by_attack"][eps_label(EPS)]
    assert by_attack["pgd"] >= 0.9  # what PGD alone would report: robust
    assert by_attack["square"] <= 0.5  # what it is not
    masking = result["masking"][eps_label(EPS)]
    assert masking["checked"] and masking["suspected"] and masking["fraction"] >= 0.4
    assert "**masking suspected** at 16/255" in markdown_table([{"dataset": "masked", **result}])


def test_autoattack_flags_the_masked_model_through_its_square_stage(classifier):
    """Inside AutoAttack, Square runs on the images its white-box stages left correct: its hits alone
    are the masking signal."""
    result = _run(QuantisedInput(classifier), ["autoattack"])
    stages = result["autoattack_stages"]["autoattack"][eps_label(EPS)]
    assert stages["fab-t"] >= 0.8  # robust accuracy after APGD-CE, APGD-T and FAB-T: the gradients are masked
    assert stages["square"] <= 0.5
    assert result["masking"][eps_label(EPS)]["suspected"]


def test_the_normal_model_is_not_flagged(classifier):
    result = _run(classifier, ["pgd", "square"])
    assert result["robust_acc_by_attack"][eps_label(EPS)]["pgd"] <= 0.1
    masking = result["masking"][eps_label(EPS)]
    assert masking["checked"] and not masking["suspected"] and masking["black_box_only"] == 0
    assert "no (Square only" in markdown_table([{"dataset": "tiny", **result}])


def test_the_replication_table_says_which_runs_are_suspected():
    def row(seed, suspected):
        return {"method": "capt", "shots": 4, "eps": "1/255", "seed": seed, "dataset": "pets", "in_distribution": True,
                "clean": 0.5, "robust": 0.2, "attack": "worst of PGD-10, AutoAttack",
                "masking": {"checked": True, "suspected": suspected, "fraction": 0.03 if suspected else 0.0}}
    line = summary_table([row(1, False), row(2, True)]).splitlines()[-1]
    assert "| worst of PGD-10, AutoAttack | **masking suspected**: pets seed 2 (3.0%) |" in line
    assert "| no |" in summary_table([row(1, False)]).splitlines()[-1]
    assert "| not checked |" in summary_table([{**row(1, False), "masking": {"checked": False}}]).splitlines()[-1]


def test_the_replication_grid_threads_the_attacks_into_its_rows_and_table(tmp_path, colour_folder):
    import json
    from capt.replicate import GridConfig, run_grid
    grid = GridConfig(model="capt-tiny-vit", pretrained="none", methods=["zeroshot"], shots=[1], eps=[16 / 255],
                      seeds=[1], eval_data=[f"imagefolder:{colour_folder}:test"], eval_samples=6, pgd_steps=2,
                      attacks=["pgd", "square", "pgd"], workers=1, device="cpu")
    [row] = run_grid(grid, tmp_path)
    assert row["attack"] == "worst of PGD-2, Square-5000"
    assert set(row["robust_by_attack"]) == {"pgd", "square"} and row["masking"]["checked"]
    assert row["robust"] <= min(row["robust_by_attack"].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["grid"]["attacks"] == ["pgd", "square"]
    header, _, line = (tmp_path / "results.md").read_text().splitlines()
    assert "| robust under | gradient masking |" in header
    # The table's cell is the row's check (what it finds on this random model is the other tests' business).
    expected = "**masking suspected**: " if row["masking"]["suspected"] else "no |"
    assert f"| worst of PGD-2, Square-5000 | {expected}" in line


def test_the_replication_grid_refuses_an_unknown_attack_before_training(tmp_path):
    from capt.replicate import GridConfig, run_grid
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        run_grid(GridConfig(attacks=["cw"]), tmp_path)
