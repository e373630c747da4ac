"""``benchmarks/gpu_checks.sh``, the one bounded command for a lent GPU, and what it relies on: that
``bentoml serve`` starts where bentoml has no console script (``pip install --target``, as there)."""
import subprocess
import sys
from pathlib import Path

import tools.launch
from tools.launch import bentoml_command

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_checks.sh"


def test_the_script_parses_and_refuses_an_unknown_mode():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_its_parts_fit_one_device_call():
    """A call runs at most 600 s and brings back at most 8 files: the parts' timeouts and files must fit."""
    text = SCRIPT.read_text()
    seconds = [int(line.split()[1]) for line in text.splitlines() if line.strip().startswith(("step ", "bench "))]
    assert len(seconds) == 5 and sum(seconds) + 10 * len(seconds) <= 590  # each killed 10 s after its SIGINT
    benches = [line.split()[2] for line in text.splitlines() if line.strip().startswith("bench ")]
    assert 2 * len(benches) + 1 <= 8  # JSON + markdown each, and the log


def test_bentoml_is_run_as_a_module_where_it_has_no_script(tmp_path, monkeypatch):
    assert bentoml_command() == [str(Path(sys.executable).with_name("bentoml"))]  # this venv has the script
    # the module form takes the same command line
    assert subprocess.run([sys.executable, "-m", "bentoml", "serve", "--help"], capture_output=True).returncode == 0
    monkeypatch.setattr(tools.launch.sys, "executable", str(tmp_path / "python3"))  # no bentoml beside it
    assert bentoml_command() == [str(tmp_path / "python3"), "-m", "bentoml"]
