"""The DistributedDataParallel code path, run as torchrun runs it: 2 CPU processes on gloo."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from capt.checkpoint import read_checkpoint


# apt: a shallow text prompt leaves a zero-size deep-prompt tensor, whose gradient DDP once waited for forever.
@pytest.mark.parametrize("method", ["capt", "apt"])
def test_two_process_training_keeps_ranks_in_sync(tmp_path, colour_folder, method):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "model": "capt-tiny-vit", "pretrained": "none", "method": method, "shots": 4, "epochs": 2,
        "batch_size": 2, "lr": 0.05, "device": "cpu",
        "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"},
        "output_dir": str(tmp_path / "run")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "capt.cli", "train", "--config", str(config), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # only rank 0 writes
    for record in records:
        assert record["world_size"] == 2
        assert record["images"] == 12  # 12 few-shot images shared by the two ranks, 6 each
        assert record["rank_param_max_diff"] == 0.0
    meta, state = read_checkpoint(tmp_path / "run")
    assert meta["epoch"] == 2 and all(torch.isfinite(v).all() for v in state.values())
