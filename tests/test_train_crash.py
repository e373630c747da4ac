"""Crash safety with real SIGKILLs (no ``finally``, no ``atexit``, no flushing in the killed process).

1. ``capt train`` killed mid-epoch and resumed with ``--resume`` ends with bit-identical prompts
   (and per-epoch losses) to an uninterrupted ``capt train`` of the same config.
2. A process killed while ``save_checkpoint`` is writing, at fixed points of the write and at random
   moments, never leaves ``latest`` pointing at a partial or missing checkpoint, and the next save
   cleans up what the killed one left behind.

Every process here is a real child process killed with SIGKILL by this test.
"""
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from capt.checkpoint import (LATEST_FILE, META_FILE, PROMPTS_FILE, STATE_FILE, load_prompted_model, read_checkpoint,
                             read_trainer_state, resolve_checkpoint)
from capt.config import load_method

pytestmark = pytest.mark.skipif(not (hasattr(signal, "SIGKILL") and hasattr(os, "fork")),
                                reason="needs POSIX SIGKILL and fork")

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # s, for anything a child process should signal; never reached when things work

# One thread per child: two children can share 2 cores, and every run does the same arithmetic.
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tail(log: Path) -> str:
    return log.read_text()[-4000:] if log.exists() else ""


@pytest.fixture
def spawn():
    """Start ``python ARGS`` in the repository, each in its own process group; at teardown, kill
    what is still running (with the workers it forked), so that a failing test leaves nothing behind."""
    procs = []

    def start(args, log: Path, **kwargs) -> subprocess.Popen:
        with log.open("w") as out:  # a file, not a pipe: a chatty child can never block on a full pipe
            kwargs = {"stdout": out, "stderr": subprocess.STDOUT, **kwargs} if "stdout" not in kwargs \
                else {"stderr": out, **kwargs}
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=CHILD_ENV, start_new_session=True, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT} s:\n{_tail(log)}")


# ---- 1. capt train, SIGKILLed mid-epoch, then --resume -------------------------------------------

EPOCHS, IMAGES, BATCH = 3, 12, 2  # colour_folder: 3 classes x 4 shots
STEPS_PER_EPOCH = IMAGES // BATCH
KILL_AT_STEP = STEPS_PER_EPOCH + 3  # three optimiser steps into epoch 2 (0-based global step)

# `capt train` exactly as the CLI runs it, except that the loss of optimisation step KILL_AT_STEP
# first writes a marker file and then waits for the test's SIGKILL, so that the kill lands mid-epoch
# at a known step without guessing times. Nothing of the computation is changed.
PAUSING_TRAINER = """
import sys, time
from pathlib import Path
import capt.train
from capt.cli import main

pause_at, marker = int(sys.argv[1]), Path(sys.argv[2])
real_loss, steps = capt.train.capt_loss, [0]

def capt_loss(*args, **kwargs):  # called once per optimisation step
    if steps[0] == pause_at:
        marker.write_text(str(steps[0]))  # steps 0 .. pause_at - 1 are done
        while True:
            time.sleep(60)
    steps[0] += 1
    return real_loss(*args, **kwargs)

capt.train.capt_loss = capt_loss
sys.exit(main(sys.argv[3:]))
"""


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_killed_mid_epoch_then_resumed_ends_with_the_same_prompts(tmp_path, colour_folder, spawn):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        # fp32: where the CPU offers bf16 (native bf16), auto is timed per fresh run, and the two runs compared here could
        # choose differently (a resumed run keeps its choice: tests/test_precision_option.py)
        "model": "capt-tiny-vit", "pretrained": "none", "method": "capt", "shots": 4, "epochs": EPOCHS, "precision": "fp32",
        "batch_size": BATCH, "warmup_epochs": 1, "lr": 0.05, "device": "cpu",
        "attack": {"eps": "2/255", "alpha": "1/255", "steps": 2},
        "data": {"name": "imagefolder", "root": str(colour_folder), "split": "train"},
        "output_dir": str(tmp_path / "unused")}))

    def cli(run_dir):
        return ["train", "--config", str(config), "--output-dir", str(run_dir), "--no-progress"]
    straight_dir, killed_dir, marker = tmp_path / "straight", tmp_path / "killed", tmp_path / "paused"

    # The uninterrupted run and the run to be killed, side by side.
    straight = spawn(["-m", "capt.cli", *cli(straight_dir)], tmp_path / "straight.log")
    killed = spawn(["-c", PAUSING_TRAINER, str(KILL_AT_STEP), str(marker), *cli(killed_dir)], tmp_path / "killed.log")
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():  # the paused trainer's signal
        if killed.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"never reached step {KILL_AT_STEP} (exit {killed.poll()}):\n{_tail(tmp_path / 'killed.log')}")
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(TIMEOUT) == -signal.SIGKILL

    # Killed mid-epoch 2: epoch 1 is checkpointed, nothing of epoch 2 is.
    assert (killed_dir / LATEST_FILE).read_text() == "epoch_001"
    assert sorted(p.name for p in killed_dir.iterdir() if "epoch_" in p.name) == ["epoch_001"]
    assert [r["epoch"] for r in _metrics(killed_dir)] == [1]
    # As if also killed while writing metrics.jsonl: the resumed run rebuilds it from the checkpoint.
    (killed_dir / "metrics.jsonl").write_text('{"epoch": 1, "lo')
    assert read_trainer_state(killed_dir)["global_step"] == STEPS_PER_EPOCH < KILL_AT_STEP

    resumed = spawn(["-m", "capt.cli", *cli(killed_dir), "--resume"], tmp_path / "resumed.log")
    for proc, log in ((resumed, tmp_path / "resumed.log"), (straight, tmp_path / "straight.log")):
        assert _finish(proc, log) == 0, _tail(log)

    for run_dir in (straight_dir, killed_dir):
        assert resolve_checkpoint(run_dir).name == f"epoch_{EPOCHS:03d}"
        assert read_trainer_state(run_dir)["global_step"] == EPOCHS * STEPS_PER_EPOCH
    expected = load_file(resolve_checkpoint(straight_dir) / PROMPTS_FILE)
    got = load_file(resolve_checkpoint(killed_dir) / PROMPTS_FILE)
    assert expected and set(got) == set(expected)
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, f"prompts differ after kill + resume: {differing}"
    # The killed run's partial epoch 2 left no trace in the losses either.
    straight_metrics, resumed_metrics = _metrics(straight_dir), _metrics(killed_dir)
    assert [r["epoch"] for r in resumed_metrics] == [1, 2, 3]
    assert [r["loss"] for r in resumed_metrics] == [r["loss"] for r in straight_metrics]


# ---- 2. SIGKILL while save_checkpoint is writing ---------------------------------------------------

BALLAST = 2_000_000  # floats (8 MB) in the trainer state, so that a save takes tens of ms

# A process that imports capt once and then, for each command line read from stdin, forks a worker
# that saves epoch after epoch (starting after `latest`, as a resumed run does) until the test kills
# it. A command names where the worker stops and waits for the kill, or is "random" (keep saving).
# Epoch e's checkpoint holds prompts, trainer-state epoch and ballast all equal to e.
CHECKPOINT_WRITER = """
import io, itertools, json, os, shutil, sys, time, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
import capt.checkpoint as ckpt
from capt.models import create_clip
from capt.prompts import PromptConfig, PromptedCLIP

run_dir, prompt, ballast_size = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = PromptedCLIP(create_clip("capt-tiny-vit", None), PromptConfig.from_dict(prompt))
ballast = torch.zeros(ballast_size)

def save(epoch):
    with torch.no_grad():
        for p in model.prompt_parameters().values():
            p.fill_(epoch)
    ballast.fill_(epoch)
    ckpt.save_checkpoint(run_dir, epoch, model, {"writer": "crash test"},
                         {"epoch": epoch, "global_step": epoch, "ballast": ballast}, keep=2)

def pause(point):  # tell the test, then wait for SIGKILL
    os.write(1, f"paused {point}\\n".encode())
    while True:
        time.sleep(60)

def hook(owner, name, point, after=False):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        if not after:
            pause(point)
        result = real(*args, **kwargs)
        if after:
            pause(point)
        return result
    setattr(owner, name, wrapper)

def half_written_state(obj, path):  # torch.save that dies half-way through the file
    buffer = io.BytesIO()
    real_torch_save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    pause("state_half_written")
real_torch_save = torch.save

def half_pruned(path, *args, **kwargs):  # dies with an old checkpoint partly deleted
    if Path(path).name.endswith(".deleting"):
        (Path(path) / ckpt.PROMPTS_FILE).unlink()
        pause("mid_pruning")
    return real_rmtree(path, *args, **kwargs)
real_rmtree = shutil.rmtree

POINTS = {
    "prompts_written": lambda: hook(ckpt, "save_file", "prompts_written", after=True),
    "state_half_written": lambda: setattr(torch, "save", half_written_state),
    "before_rename": lambda: hook(os, "rename", "before_rename"),
    "before_latest": lambda: hook(os, "replace", "before_latest"),
    "before_pruning": lambda: hook(ckpt, "atomic_write_text", "before_pruning", after=True),
    "mid_pruning": lambda: setattr(shutil, "rmtree", half_pruned),
    "random": lambda: None,
}

def next_epoch():
    return json.loads((ckpt.resolve_checkpoint(run_dir) / ckpt.META_FILE).read_text())["epoch"] + 1

save(1)
print("ready", flush=True)
for command in sys.stdin:
    command = command.strip()
    if command == "finish":  # one clean save
        save(next_epoch())
        print("finished", flush=True)
        continue
    start = next_epoch()
    pid = os.fork()
    if pid == 0:
        try:
            POINTS[command]()
            for epoch in itertools.count(start) if command == "random" else [start]:
                save(epoch)
            print(f"{command}: the save never got there", file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    print(f"worker {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
"""


class _Lines:
    """The writer's stdout, line by line, with a timeout."""

    def __init__(self, proc, log: Path):
        self.proc, self.log, self.lines = proc, log, queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def next(self, exit_expected: bool = False) -> tuple[str, str]:
        try:
            kind, _, value = self.lines.get(timeout=TIMEOUT).partition(" ")
        except queue.Empty:
            pytest.fail(f"checkpoint writer silent for {TIMEOUT} s:\n{_tail(self.log)}")
        if kind == "eof":
            pytest.fail(f"checkpoint writer ended (exit {self.proc.wait()}):\n{_tail(self.log)}")
        if kind == "exit" and not exit_expected:
            pytest.fail(f"a worker exited with {value} before it was killed:\n{_tail(self.log)}")
        return kind, value


def _check_latest(run_dir: Path, rebuild: bool = True) -> int:
    """`latest` names a complete, loadable checkpoint whose every part is of the same epoch.
    ``rebuild``: load it as ``capt eval`` does (builds a model: 0.3 s), else read its files only."""
    name = (run_dir / LATEST_FILE).read_text()
    assert re.fullmatch(r"epoch_\d{3}", name), f"latest names {name!r}"
    assert {PROMPTS_FILE, META_FILE, STATE_FILE} <= {p.name for p in (run_dir / name).iterdir()}
    if rebuild:
        model, meta = load_prompted_model(run_dir)
        prompts = model.prompt_state_dict()
    else:
        meta, prompts = read_checkpoint(run_dir)
    epoch = meta["epoch"]
    assert name == f"epoch_{epoch:03d}"
    assert prompts and all(torch.all(p == epoch) for p in prompts.values())
    state = read_trainer_state(run_dir)
    assert state["epoch"] == epoch and state["ballast"].numel() == BALLAST and torch.all(state["ballast"] == epoch)
    return epoch


def test_sigkill_while_writing_a_checkpoint_never_corrupts_the_latest_one(tmp_path, spawn):
    run_dir, log = tmp_path / "run", tmp_path / "writer.log"
    writer = spawn(["-c", CHECKPOINT_WRITER, str(run_dir), json.dumps(load_method("capt")["prompt"]), str(BALLAST)],
                   log, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = _Lines(writer, log)
    assert lines.next() == ("ready", "")
    epoch = _check_latest(run_dir)
    assert epoch == 1

    def kill_worker(command: str, delay: float | None = None) -> dict:
        writer.stdin.write(command + "\n")
        writer.stdin.flush()
        seen = dict([lines.next()])
        if delay is None:  # wait until the worker has stopped at its point
            while "paused" not in seen or "worker" not in seen:
                seen.update([lines.next()])
        else:
            time.sleep(delay)
        os.kill(int(seen["worker"]), signal.SIGKILL)
        assert lines.next(exit_expected=True) == ("exit", str(-signal.SIGKILL))
        return seen

    # Killed at each step of a save of epoch e: before `latest` moves, it still names e - 1.
    for point in ("prompts_written", "state_half_written", "before_rename", "before_latest"):
        assert kill_worker(point)["paused"] == point
        assert _check_latest(run_dir) == epoch, point
        being_written = f"epoch_{epoch + 1:03d}"
        if point == "before_latest":  # renamed into place, but not the latest yet
            assert (run_dir / being_written / STATE_FILE).is_file()
        else:
            assert (run_dir / f".{being_written}.tmp").is_dir() and not (run_dir / being_written).exists()
    # ... and after `latest` moved, but before old checkpoints were pruned.
    assert kill_worker("before_pruning")["paused"] == "before_pruning"
    assert _check_latest(run_dir) == epoch + 1
    epoch += 1
    # ... and half-way through deleting an old checkpoint: no epoch_NNN folder is left incomplete.
    assert kill_worker("mid_pruning")["paused"] == "mid_pruning"
    assert _check_latest(run_dir) == epoch + 1
    epoch += 1
    epochs = [p for p in run_dir.iterdir() if re.fullmatch(r"epoch_\d{3}", p.name)]
    assert epochs and all((p / PROMPTS_FILE).is_file() for p in epochs)

    # Killed at random moments of saving epoch after epoch.
    rng = random.Random(0)
    for _ in range(8):
        kill_worker("random", delay=rng.uniform(0.0, 0.25))
        now = _check_latest(run_dir, rebuild=False)
        assert now >= epoch, "latest went backwards"
        epoch = now

    # A clean save afterwards removes everything the killed ones left behind.
    writer.stdin.write("finish\n")
    writer.stdin.flush()
    assert lines.next() == ("finished", "")
    assert _check_latest(run_dir) == epoch + 1
    assert sorted(p.name for p in run_dir.iterdir()) == [f"epoch_{epoch:03d}", f"epoch_{epoch + 1:03d}", LATEST_FILE]

    writer.stdin.close()  # the writer's last command
    assert writer.wait(TIMEOUT) == 0, _tail(log)
