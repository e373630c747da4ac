"""--precision auto|fp32|bf16|fp16: parsing, the legacy amp key, the resume check, and evaluation's
attacks staying fp32 under auto."""
import dataclasses
import json

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from capt import PromptedCLIP
from capt.checkpoint import LATEST_FILE
from capt.cli import build_parser, main
from capt.config import TrainConfig
from capt.data import LabeledDataset
from capt.evaluate import check_eval_precision, eval_precision, evaluate
from capt.hardware import Hardware
from capt.pretrain import PretrainConfig
from capt.prompts import ZeroShotClassifier
from capt.train import train

BF16_CPU = Hardware.from_flags({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})  # AMX: auto is bf16
AVX512_BF16_CPU = Hardware.from_flags({"avx2", "avx512f", "avx512_bf16"})  # Zen 4/5: native bf16, no AMX
AVX2_CPU = Hardware.from_flags({"avx2"})


@pytest.mark.parametrize("command", [["train", "--config", "x.yaml"], ["pretrain", "--output", "out"],
                                     ["eval", "--data", "x"]])
def test_every_command_takes_precision(command):
    parser = build_parser()
    assert parser.parse_args(command + ["--precision", "bf16"]).precision == "bf16"
    defaults = parser.parse_args(command).precision
    assert defaults in (None, "auto")  # None: train and pretrain keep the config's own (default auto)
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--precision", "int8"])


def test_train_config_precision_and_the_legacy_amp_key():
    assert TrainConfig.from_dict({}).precision == "auto"
    assert TrainConfig.from_dict({"precision": "fp16"}).precision == "fp16"
    assert TrainConfig.from_dict({"amp": True}).precision == "cuda-bf16"
    assert TrainConfig.from_dict({"amp": False}).precision == "fp32"
    assert not hasattr(TrainConfig.from_dict({"amp": True}), "amp")
    with pytest.raises(ValueError, match="amp is the old name"):
        TrainConfig.from_dict({"amp": True, "precision": "fp16"})
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig.from_dict({"precision": "half"})


def test_the_command_line_precision_replaces_a_legacy_amp(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"amp": True}))
    assert TrainConfig.from_yaml(path).precision == "cuda-bf16"
    assert TrainConfig.from_yaml(path, {"precision": "bf16"}).precision == "bf16"


def _run_dir(tmp_path, saved: dict):
    run = tmp_path / "run"
    run.mkdir()
    (run / LATEST_FILE).write_text("epoch_001\n")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run


def test_resume_compares_the_precision_a_run_used(tmp_path):
    config = TrainConfig.from_dict({"precision": "fp32", "device": "cpu", "output_dir": str(tmp_path / "run")})
    saved = {**config.to_dict(), "precision": "bf16"}
    _run_dir(tmp_path, saved)
    with pytest.raises(ValueError, match=r"different configuration \(precision\)"):
        train(config, resume=True, progress=False)


def test_resume_of_a_legacy_amp_run_on_cpu_is_the_fp32_it_ran_in(tmp_path):
    config = TrainConfig.from_dict({"precision": "fp32", "device": "cpu", "output_dir": str(tmp_path / "run"),
                                    "epochs": 7})
    legacy = {k: v for k, v in config.to_dict().items() if k != "precision"}
    _run_dir(tmp_path, {**legacy, "amp": True, "epochs": 5})
    # amp: true on CPU was fp32, so precision is not what differs: only epochs, which this config changed.
    with pytest.raises(ValueError, match=r"different configuration \(epochs\)"):
        train(config, resume=True, progress=False)


def test_a_training_run_records_the_precision_it_used(tmp_path, colour_folder):
    config = TrainConfig.from_dict({
        "model": "capt-tiny-vit", "pretrained": "none", "method": "apt", "device": "cpu", "precision": "bf16",
        "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"}, "shots": 2, "epochs": 1,
        "batch_size": 3, "attack": {"eps": "1/255", "steps": 1}, "output_dir": str(tmp_path / "run")})
    run = train(config, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "bf16"
    auto = TrainConfig.from_dict({**yaml.safe_load((run / "config.yaml").read_text()), "precision": "auto",
                                  "epochs": 2})
    # auto resolves on this machine: the precision is accepted on resume exactly when auto could have
    # chosen what the run used (bf16 where this CPU offers it to the timing). The changed epochs are
    # refused either way; what matters is whether the precision is named among the differences.
    from capt.hardware import offered_precision
    with pytest.raises(ValueError, match="different configuration") as refused:
        train(auto, resume=True, progress=False)
    assert ("precision" in str(refused.value)) == (offered_precision("cpu") != "bf16")


def test_a_timed_auto_run_records_its_choice_and_why(tmp_path, colour_folder, machine_offers_bf16):
    """Where the machine offers bf16 (faked here, so on every CPU), auto times one step each way; the run
    keeps what it chose and why (the timing and what else used the CPUs) in precision.json."""
    from capt.train import PRECISION_FILE
    config = TrainConfig.from_dict({
        "model": "capt-tiny-vit", "pretrained": "none", "method": "apt", "device": "cpu", "precision": "auto",
        "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"}, "shots": 2, "epochs": 1,
        "batch_size": 3, "attack": {"eps": "1/255", "steps": 1}, "output_dir": str(tmp_path / "run")})
    run = train(config, progress=False)
    timing = json.loads((run / PRECISION_FILE).read_text())
    assert timing["precision"] == yaml.safe_load((run / "config.yaml").read_text())["precision"]
    assert "measured here: one step" in timing["why"] and "used by others" in timing["why"]
    # A fresh fp32 start in a folder where a timed run stopped before its first checkpoint: that run's
    # choice must not stay beside this run's config.yaml.
    stale = tmp_path / "unfinished"
    stale.mkdir()
    (stale / PRECISION_FILE).write_text((run / PRECISION_FILE).read_text())
    train(dataclasses.replace(config, precision="fp32", output_dir=str(stale)), progress=False)
    assert yaml.safe_load((stale / "config.yaml").read_text())["precision"] == "fp32"
    assert not (stale / PRECISION_FILE).exists()


def test_pretrain_precision_is_checked():
    assert PretrainConfig().precision == "auto"
    with pytest.raises(ValueError, match="precision must be one of"):
        PretrainConfig(precision="tf32")


def test_eval_precision_applies_to_clean_only_evaluations():
    assert eval_precision("auto", [1 / 255], "cpu", BF16_CPU) == {"requested": "auto", "clean": "fp32", "attacks": "fp32"}
    assert eval_precision("auto", [], "cpu", BF16_CPU)["clean"] == "bf16"
    assert eval_precision("auto", [], "cpu", AVX2_CPU)["clean"] == "fp32"
    assert eval_precision("auto", [], "cpu", AVX512_BF16_CPU)["clean"] == "fp32"  # measured slower than fp32 (Zen 5)
    assert eval_precision("bf16", [], "cpu", AVX512_BF16_CPU)["clean"] == "bf16"  # still there when asked for
    with pytest.raises(ValueError, match="clean-only"):
        check_eval_precision("bf16", [4 / 255])
    check_eval_precision("bf16", [])


def _spy_autocast(monkeypatch):
    seen = []
    original = ZeroShotClassifier.forward

    def forward(self, images):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, images)
    monkeypatch.setattr(ZeroShotClassifier, "forward", forward)
    return seen


def _data(model):
    classnames = ["red", "green", "blue"]
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return LabeledDataset("noise", TensorDataset(images, labels), classnames, ["a photo of a {}."], labels.tolist())


def test_eval_attacks_run_fp32_under_auto_even_where_bf16_is_fast(tiny_clip, monkeypatch):
    model = PromptedCLIP(tiny_clip)
    seen = _spy_autocast(monkeypatch)
    result = evaluate(model, _data(model), [2 / 255], steps=2, progress=False, precision="auto", hardware=BF16_CPU)
    assert result["precision"] == {"requested": "auto", "clean": "fp32", "attacks": "fp32"}
    assert seen and not any(seen)  # every forward (clean, attack steps, judgement) outside autocast


def test_a_clean_only_evaluation_runs_in_the_chosen_precision(tiny_clip, monkeypatch):
    model = PromptedCLIP(tiny_clip)
    seen = _spy_autocast(monkeypatch)
    result = evaluate(model, _data(model), [], progress=False, precision="auto", hardware=BF16_CPU)
    assert result["precision"]["clean"] == "bf16" and seen and all(seen)
    assert 0.0 <= result["clean_acc"] <= 1.0


def test_cli_refuses_a_reduced_precision_with_attacks(capsys):
    assert main(["eval", "--model", "capt-tiny-vit", "--data", "imagefolder:nowhere", "--precision", "bf16",
                 "--eps", "1/255"]) == 2
    assert "clean-only" in capsys.readouterr().err


def _step_taking(seconds_fp32, seconds_reduced, calls, monkeypatch):
    """A step that "takes" the given seconds on a fake clock read by timed_precision: the verdict rests on
    these figures, not on how this machine happens to sleep."""
    import capt.hardware
    clock = [0.0]
    monkeypatch.setattr(capt.hardware.time, "perf_counter", lambda: clock[0])

    def step():
        calls.append(torch.is_autocast_enabled("cpu"))
        torch.rand(3)  # the global RNG is the caller's: timed_precision restores it
        clock[0] += seconds_reduced if torch.is_autocast_enabled("cpu") else seconds_fp32
    return step


def test_auto_keeps_fp32_without_timing_where_the_machine_offers_nothing_faster(monkeypatch):
    from capt.hardware import timed_precision
    calls = []
    assert timed_precision(_step_taking(0.03, 0.01, calls, monkeypatch), "cpu", AVX2_CPU)[0] == "fp32" and calls == []


def test_auto_times_bf16_wherever_it_is_native_amx_or_not(monkeypatch):
    """AVX512_BF16 without AMX: the untimed rule is fp32, but a model that runs faster in bf16 there (the
    probe's ViT-B-32 attack step, 2.0x on a Zen 5) gets it, and one that does not keeps fp32."""
    from capt.hardware import offered_precision, recommended_precision, timed_precision
    assert recommended_precision("cpu", AVX512_BF16_CPU) == "fp32" and offered_precision("cpu", AVX512_BF16_CPU) == "bf16"
    calls = []
    precision, why = timed_precision(_step_taking(0.02, 0.01, calls, monkeypatch), "cpu", AVX512_BF16_CPU)
    assert precision == "bf16" and "2.00x" in why and "avx512_bf16" in why and True in calls
    precision, why = timed_precision(_step_taking(0.01, 0.0114, [], monkeypatch), "cpu", AVX512_BF16_CPU)
    assert precision == "fp32" and "under the 1.10x" in why


def test_auto_takes_the_reduced_precision_only_where_the_model_runs_faster_in_it(monkeypatch):
    from capt.hardware import timed_precision
    calls = []
    state = torch.random.get_rng_state()
    precision, why = timed_precision(_step_taking(0.03, 0.01, calls, monkeypatch), "cpu", BF16_CPU)
    assert precision == "bf16" and "30.0 ms in fp32, 10.0 ms in bf16, 3.00x" in why
    assert True in calls and False in calls and torch.equal(torch.random.get_rng_state(), state)
    precision, why = timed_precision(_step_taking(0.01, 0.03, [], monkeypatch), "cpu", BF16_CPU)  # the tiny-model case
    assert precision == "fp32" and "0.33x" in why and "under the 1.10x" in why
    precision, _ = timed_precision(_step_taking(0.0105, 0.01, [], monkeypatch), "cpu", BF16_CPU)  # 1.05x: not worth it
    assert precision == "fp32"
    precision, _ = timed_precision(_step_taking(0.0111, 0.01, [], monkeypatch), "cpu", BF16_CPU)  # 1.11x
    assert precision == "bf16"


def test_auto_takes_bf16_only_if_every_timed_round_shows_the_gain(monkeypatch):
    """A VM's speed drifts between rounds: one round at 1.3x and one at 1.0x is no gain."""
    import capt.hardware
    from capt.hardware import timed_precision
    warmup = [(0.01, 0.01), (0.01, 0.01)]  # two settled warm-up rounds first
    step = _rounds_taking(warmup + [(0.013, 0.01), (0.010, 0.01), (0.013, 0.01)], monkeypatch)
    precision, why = timed_precision(step, "cpu", BF16_CPU)
    assert precision == "fp32" and "1.00x in its worst of 3 round(s) (1.30x, 1.00x, 1.30x)" in why
    assert "after 2 warm-up round(s)" in why


def _rounds_taking(rounds, monkeypatch):
    """A step whose (fp32, reduced) seconds on a fake clock are, round after round, ``rounds``."""
    import capt.hardware
    clock, rounds, pending = [0.0], iter(rounds), []

    def step():
        if not torch.is_autocast_enabled("cpu"):
            pending[:] = next(rounds)
        clock[0] += pending[1] if torch.is_autocast_enabled("cpu") else pending[0]
    monkeypatch.setattr(capt.hardware.time, "perf_counter", lambda: clock[0])
    return step


def test_auto_warms_up_until_both_precisions_have_settled(monkeypatch):
    """As measured on an AMX Xeon's pretraining step: fp32 ran 2-3x slower for a few rounds after the first
    bf16 step, then as fast as bf16. Timed in those rounds, bf16 "won" every one; warmed up until each side
    is back within 10% of its fastest, the timing sees the steady 1.01x and keeps fp32."""
    from capt.hardware import MAX_WARMUP_ROUNDS, timed_precision
    slow_phase = [(0.01, 0.01), (0.03, 0.01), (0.03, 0.01), (0.03, 0.01), (0.01, 0.01)]
    precision, why = timed_precision(_rounds_taking(slow_phase + [(0.0101, 0.01)] * 3, monkeypatch), "cpu", BF16_CPU)
    assert precision == "fp32" and "after 5 warm-up round(s)" in why and "1.01x in its worst of 3" in why
    assert "(not settled)" not in why
    # A side that never settles stops the warm-up at its cap (the fake clock stays far under half the
    # budget), says so, and the timed rounds follow.
    never = [(0.01 * 2 ** i, 0.01) for i in range(MAX_WARMUP_ROUNDS)]
    precision, why = timed_precision(_rounds_taking(never + [(0.03, 0.01)] * 3, monkeypatch), "cpu", BF16_CPU)
    assert precision == "bf16" and f"after {MAX_WARMUP_ROUNDS} warm-up round(s) (not settled)" in why


def test_a_step_still_getting_faster_has_not_settled(monkeypatch):
    """A cold first round is usually the slowest, so "within 10% of the fastest so far" alone would call
    any faster round settled. Here bf16 (twice as fast as fp32 once warm) speeds up over five rounds: a
    warm-up that stopped at its second round would time rounds 3-5 at 0.67x, 1.00x, 2.00x and keep fp32."""
    from capt.hardware import timed_precision
    cold_bf16 = [(0.02, b) for b in (0.06, 0.045, 0.03, 0.02, 0.01, 0.01)] + [(0.02, 0.01)] * 3
    precision, why = timed_precision(_rounds_taking(cold_bf16, monkeypatch), "cpu", BF16_CPU)
    assert precision == "bf16" and "2.00x in its worst of 3" in why
    assert "after 6 warm-up round(s)" in why and "(not settled)" not in why


def test_a_slow_step_stops_warming_up_at_half_the_budget(monkeypatch):
    """Whatever the budget, 2 warm-up and 2 timed rounds run; past half the budget no more warm-up."""
    from capt.hardware import timed_precision
    slow = [(0.01 * 2 ** i, 0.01) for i in range(6)] + [(0.03, 0.01)] * 3
    precision, why = timed_precision(_rounds_taking(slow, monkeypatch), "cpu", BF16_CPU, budget_s=0.05)
    assert "after 2 warm-up round(s) (not settled)" in why and "in its worst of 2 round(s)" in why


def test_training_times_auto_once_and_a_resume_continues_its_choice(tmp_path, colour_folder, monkeypatch, machine_offers_bf16):
    import capt.hardware
    import capt.train
    timed = []

    def fake_timing(step, device):
        step()  # the real step runs (its gradients are dropped by the trainer)
        timed.append(device)
        return "fp32", "fp32: measured slower in bf16 (test)"
    monkeypatch.setattr(capt.train, "timed_precision", fake_timing)
    values = {"model": "capt-tiny-vit", "pretrained": "none", "method": "capt", "device": "cpu", "precision": "auto",
              "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"}, "shots": 2,
              "epochs": 2, "batch_size": 3, "attack": {"eps": "1/255", "steps": 1}, "output_dir": str(tmp_path / "run")}
    run = train(TrainConfig.from_dict(values), progress=False, stop_after_epoch=1)
    assert len(timed) == 1 and yaml.safe_load((run / "config.yaml").read_text())["precision"] == "fp32"
    train(TrainConfig.from_dict(values), resume=True, progress=False)  # auto continues the fp32 run, untimed
    assert len(timed) == 1  # not timed again
    explicit = train(TrainConfig.from_dict({**values, "precision": "bf16", "output_dir": str(tmp_path / "b")}),
                     progress=False, stop_after_epoch=1)
    assert len(timed) == 1 and yaml.safe_load((explicit / "config.yaml").read_text())["precision"] == "bf16"


def test_timing_auto_leaves_no_trace_in_the_run(tmp_path, colour_folder, monkeypatch, machine_offers_bf16):
    """An auto run that timed both precisions and kept fp32 trains exactly as an fp32 run: the timing's
    gradients are dropped and the RNG it used is restored."""
    import capt.hardware
    from capt.checkpoint import read_checkpoint
    monkeypatch.setattr(capt.hardware, "MIN_PRECISION_GAIN", 1e9)  # the real timing runs, then keeps fp32
    values = {"model": "capt-tiny-vit", "pretrained": "none", "method": "capt", "device": "cpu",
              "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"}, "shots": 2,
              "epochs": 1, "batch_size": 3, "attack": {"eps": "1/255", "steps": 2}}
    auto = train(TrainConfig.from_dict({**values, "precision": "auto", "output_dir": str(tmp_path / "a")}), progress=False)
    exact = train(TrainConfig.from_dict({**values, "precision": "fp32", "output_dir": str(tmp_path / "f")}), progress=False)
    assert yaml.safe_load((auto / "config.yaml").read_text())["precision"] == "fp32"
    prompts_auto, prompts_exact = read_checkpoint(auto)[1], read_checkpoint(exact)[1]
    assert prompts_auto.keys() == prompts_exact.keys()
    for name in prompts_auto:
        assert torch.equal(prompts_auto[name], prompts_exact[name]), name


@pytest.mark.parametrize("others_share, contended", [(0.02, False), (0.6, True)])
def test_auto_says_what_else_used_the_cpus_while_it_was_timed(monkeypatch, caplog, others_share, contended):
    """A run records what its precision was timed beside; a timing beside a neighbour's load says it
    may not hold on an idle machine (and warns)."""
    import contextlib
    import capt.hardware
    from capt.hardware import CpuContention, timed_precision

    @contextlib.contextmanager
    def fake_contention():
        result = CpuContention(cpus=2)
        yield result
        result.seconds, result.others_share, result.steal_share = 1.0, others_share, 0.0
    monkeypatch.setattr(capt.hardware, "measuring_contention", fake_contention)
    with caplog.at_level("WARNING", logger="capt.hardware"):
        precision, why = timed_precision(_step_taking(0.03, 0.01, [], monkeypatch), "cpu", BF16_CPU)
    assert precision == "bf16" and f"meanwhile {others_share:.0%} of this process's 2 CPU(s) used by others" in why
    assert ("contended" in why) is contended and any("timed while" in r.message for r in caplog.records) is contended
