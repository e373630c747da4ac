"""Each concept has one home: checks of the package structure, not of behaviour."""
import subprocess
import sys
from pathlib import Path

from capt.models import REPO_ROOT


def test_capt_imports_nothing_of_the_packages_built_on_it():
    # capt is the library; export and serving depend on it, never the other way round (the command line
    # once imported export inside main() for its error types; `capt export` is now a plugin).
    import re
    importing = [path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "capt").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+(export|serving|tools)\b", path.read_text(), re.M)]
    assert importing == []
    code = ("import sys, capt.cli, capt.train, capt.evaluate, capt.replicate, capt.pretrain, capt.default_model; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'export', 'serving', 'tools'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_capt_export_is_plugged_in_through_its_entry_point():
    from importlib.metadata import entry_points
    assert [e.value for e in entry_points(group="capt.commands") if e.name == "export"] == ["export.cli:register"]
    result = subprocess.run([sys.executable, "-m", "capt.cli", "export", "--help"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0 and "--precision" in result.stdout


def test_the_default_models_path_is_written_in_one_module():
    homes = [path.relative_to(REPO_ROOT).as_posix() for package in ("capt", "export", "serving", "benchmarks", "tools")
             for path in (REPO_ROOT / package).rglob("*.py") if '"capt-toy"' in path.read_text()]
    assert homes == ["capt/default_model.py"]


def test_the_bento_ships_no_test_harness():
    include = [line.strip()[2:].strip('"') for line in (REPO_ROOT / "bentofile.yaml").read_text().splitlines()
               if line.strip().startswith("- ") and "/" in line]
    shipped = {p.relative_to(REPO_ROOT).as_posix() for pattern in include for p in Path(REPO_ROOT).glob(pattern)}
    assert "serving/service.py" in shipped and not any(p.startswith(("tools/", "tests/")) for p in shipped)
