"""``max_steps``: a dry run of a protocol that stops after a few optimiser steps, takes exactly the steps
a full run would take first, computes the frozen CLIP's features only for the images those steps read,
and, resumed, trains no further."""
import json

import pytest
import torch

import capt.train
from capt import PromptedCLIP
from capt.checkpoint import read_checkpoint, read_trainer_state
from capt.config import TrainConfig
from capt.train import _TrainingStep, train
from test_train import make_config, prompts_of

IMAGES, BATCH = 12, 4  # colour_folder: 3 classes x 4 shots; 3 steps an epoch


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _count_steps(monkeypatch) -> list:
    """One entry per training step (``_TrainingStep.forward`` runs once a step)."""
    steps, real_forward = [], _TrainingStep.forward

    def forward(self, *args, **kwargs):
        steps.append(1)
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(_TrainingStep, "forward", forward)
    return steps


def _count_frozen_rows(monkeypatch) -> list:
    """Images encoded by the frozen CLIP: CAPT prompts both towers, so an image forward without vision
    prompts is the frozen CLIP's (as in test_train_step)."""
    rows, real = [], PromptedCLIP.encode_image

    def encode_image(self, pixels, *args, **kwargs):
        if not self.vision_prompted:
            rows.append(pixels.shape[0])
        return real(self, pixels, *args, **kwargs)
    monkeypatch.setattr(PromptedCLIP, "encode_image", encode_image)
    return rows


def _prompts_before_step(monkeypatch, index: int) -> dict:
    """Filled with the prompts as they are when step ``index`` (0-based) starts, i.e. after ``index`` steps."""
    kept, calls, real_forward = {}, [0], _TrainingStep.forward

    def forward(self, *args, **kwargs):
        if calls[0] == index:
            kept.update({k: v.detach().clone() for k, v in self.model.prompt_state_dict().items()})
        calls[0] += 1
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(_TrainingStep, "forward", forward)
    return kept


def _images_of_batches_holding(rows: list[int]) -> int:
    """How many images the full frozen pass's batches (dataset order) that hold ``rows`` contain."""
    return sum(len(range(b * BATCH, min((b + 1) * BATCH, IMAGES))) for b in {r // BATCH for r in rows})


def _equal(first: dict, second: dict) -> bool:
    return set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_max_steps_must_be_at_least_one_or_left_out():
    assert TrainConfig.from_dict({}).max_steps is None
    assert TrainConfig.from_dict({"max_steps": 1}).max_steps == 1
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_steps must be >= 1"):
            TrainConfig.from_dict({"max_steps": bad})


def test_a_run_stops_after_max_steps_with_the_record_and_checkpoint_of_its_epoch(tmp_path, colour_folder,
                                                                                 monkeypatch):
    steps = _count_steps(monkeypatch)
    run_dir = train(make_config(tmp_path, colour_folder, epochs=3, batch_size=BATCH, max_steps=2), progress=False)
    assert len(steps) == 2  # of the 9 that 3 epochs would take
    [record] = _metrics(run_dir)
    assert record["epoch"] == 1 and record["step"] == 2 and record["images"] == 2 * BATCH
    meta, _ = read_checkpoint(run_dir)
    assert meta["epoch"] == 1 and meta["metrics"]["step"] == 2
    assert read_trainer_state(run_dir)["global_step"] == 2
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_001"]


def test_a_run_whose_max_steps_reach_into_the_next_epoch_records_both_epochs(tmp_path, colour_folder, monkeypatch):
    frozen_rows = _count_frozen_rows(monkeypatch)
    run_dir = train(make_config(tmp_path, colour_folder, epochs=3, batch_size=BATCH, max_steps=4), progress=False)
    assert [(r["epoch"], r["step"], r["images"]) for r in _metrics(run_dir)] == [(1, 3, IMAGES), (2, 4, BATCH)]
    assert sum(frozen_rows) == IMAGES  # steps beyond the first epoch: every row's frozen features, as a full run


@pytest.mark.parametrize("method", ["apt", "capt"])  # without and with the frozen CLIP's features
def test_the_steps_of_a_max_steps_run_are_the_first_steps_of_the_full_run(tmp_path, colour_folder, monkeypatch,
                                                                           method):
    after_two_steps = _prompts_before_step(monkeypatch, 2)
    train(make_config(tmp_path / "full", colour_folder, method=method, epochs=3, batch_size=BATCH), progress=False)
    monkeypatch.undo()
    dry = train(make_config(tmp_path / "dry", colour_folder, method=method, epochs=3, batch_size=BATCH, max_steps=2),
                progress=False)
    assert after_two_steps and _equal(prompts_of(dry), after_two_steps)


def test_a_dry_run_computes_the_frozen_features_of_the_images_it_reads_only(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path / "dry", colour_folder, epochs=3, batch_size=BATCH, max_steps=2)
    assert config.loss.needs_frozen
    frozen_rows = _count_frozen_rows(monkeypatch)
    requested, real_features = [], capt.train._frozen_image_features

    def frozen_features(model, dataset, config, device, distributed, autocast, rows=None):
        requested.append(rows)
        return real_features(model, dataset, config, device, distributed, autocast, rows)
    monkeypatch.setattr(capt.train, "_frozen_image_features", frozen_features)
    dry = train(config, progress=False)
    # The rows are those of the first epoch's first two batches: the order the training loop takes;
    # the pass encodes the full pass's batches that hold them (the same batches: the same features).
    read = capt.train._epoch_order(config, 0, IMAGES)[:2 * BATCH]
    assert requested == [read]
    assert sum(frozen_rows) == _images_of_batches_holding(read)

    # And they are what the steps read: the same prompts as a dry run given every row's features.
    monkeypatch.setattr(capt.train, "_rows_left_to_visit", lambda *args: None)
    frozen_rows.clear()
    every_row = train(make_config(tmp_path / "all", colour_folder, epochs=3, batch_size=BATCH, max_steps=2),
                      progress=False)
    assert sum(frozen_rows) == IMAGES
    assert _equal(prompts_of(dry), prompts_of(every_row))


def test_a_resumed_run_that_reached_max_steps_trains_no_further(tmp_path, colour_folder, monkeypatch):
    config = make_config(tmp_path, colour_folder, epochs=3, batch_size=BATCH, max_steps=2)
    run_dir = train(config, progress=False)
    before, history = prompts_of(run_dir), _metrics(run_dir)
    steps, frozen_rows = _count_steps(monkeypatch), _count_frozen_rows(monkeypatch)
    assert train(config, resume=True, progress=False) == run_dir
    assert not steps and not frozen_rows  # neither a step nor the frozen-feature pass
    assert _equal(prompts_of(run_dir), before) and _metrics(run_dir) == history
    assert read_trainer_state(run_dir)["global_step"] == 2


def test_a_dry_run_resumed_after_an_epoch_takes_the_steps_an_uninterrupted_one_does(tmp_path, colour_folder,
                                                                                     monkeypatch):
    straight = train(make_config(tmp_path / "a", colour_folder, epochs=3, batch_size=BATCH, max_steps=4),
                     progress=False)
    interrupted = make_config(tmp_path / "b", colour_folder, epochs=3, batch_size=BATCH, max_steps=4)
    train(interrupted, stop_after_epoch=1, progress=False)
    frozen_rows = _count_frozen_rows(monkeypatch)
    train(interrupted, resume=True, progress=False)
    # the one step left, in epoch 2: that epoch's first batch, in the full pass's batches that hold it
    assert sum(frozen_rows) == _images_of_batches_holding(capt.train._epoch_order(interrupted, 1, IMAGES)[:BATCH])
    assert _equal(prompts_of(straight), prompts_of(interrupted.output_dir))
    assert [r["step"] for r in _metrics(tmp_path / "b" / "run")] == [3, 4]


def test_the_frozen_pass_of_chosen_rows_is_the_full_pass_on_the_batches_that_hold_them(tmp_path, colour_folder):
    import contextlib
    from capt.data import load_dataset
    from capt.models import create_clip, pixel_transform
    from capt.prompts import PromptConfig
    torch.manual_seed(0)
    clip = create_clip("capt-tiny-vit", "none")
    model = PromptedCLIP(clip, PromptConfig()).eval()
    dataset = load_dataset(f"imagefolder:{colour_folder}:train", pixel_transform(clip.preprocess_cfg)).dataset
    config = make_config(tmp_path, colour_folder, batch_size=BATCH)
    distributed = capt.train._Distributed(torch.device("cpu"))
    no_autocast = contextlib.nullcontext
    full = capt.train._frozen_image_features(model, dataset, config, torch.device("cpu"), distributed, no_autocast)
    chosen = capt.train._frozen_image_features(model, dataset, config, torch.device("cpu"), distributed, no_autocast,
                                               [5])
    assert torch.equal(chosen[4:8], full[4:8])  # row 5's batch, bit for bit
    assert not chosen[:4].any() and not chosen[8:].any() and full[:4].abs().sum() > 0
