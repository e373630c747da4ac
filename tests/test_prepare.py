import os
import subprocess
import sys
import textwrap

from capt.models import REPO_ROOT

# Run in a fresh interpreter: BentoML reads BENTOML_HOME once, when it is first imported.
SCRIPT = textwrap.dedent("""
    import sys, bentoml
    from serving import prepare
    exported = []
    prepare.build_default_bundle = lambda: exported.append(1)
    with bentoml.models.create("capt-default", module="export", metadata={"source_sha256": sys.argv[1]}):
        pass
    code = prepare.main()
    print("exported" if exported else f"kept {code}")
""")


def _prepare_with_stored_fingerprint(fingerprint, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "HF_HUB_OFFLINE": "1"}
    env.pop("CAPT_BUNDLE", None)
    env.pop("CAPT_MODEL_TAG", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT, fingerprint], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_default_export_of_other_weights_is_exported_again(tmp_path):
    output = _prepare_with_stored_fingerprint("0" * 64, tmp_path)
    assert "exported from another version of models/capt-toy/" in output and output.strip().endswith("exported")


def test_a_default_export_of_the_committed_weights_is_kept(tmp_path):
    from serving.prepare import default_model_fingerprint
    # The stored model is an empty folder, so it is kept and then refused as damaged (exit code 2).
    assert _prepare_with_stored_fingerprint(default_model_fingerprint(), tmp_path).strip().endswith("kept 2")


def test_the_fingerprint_covers_the_exporter_and_the_libraries_that_shape_a_graph(tmp_path, monkeypatch):
    import shutil
    from export import fingerprint
    from serving.prepare import default_model_fingerprint
    committed = default_model_fingerprint()
    versions = fingerprint.library_versions()
    monkeypatch.setattr(fingerprint, "library_versions", lambda: {**versions, "onnxscript": "0.0.1"})
    assert default_model_fingerprint() != committed  # another onnxscript traces other graphs
    monkeypatch.setattr(fingerprint, "library_versions", lambda: versions)
    assert default_model_fingerprint() == committed
    copy = tmp_path / "repo"
    for source in fingerprint.GRAPH_SOURCES:
        (copy / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / source, copy / source)
    monkeypatch.setattr(fingerprint, "REPO_ROOT", copy)
    assert default_model_fingerprint() == committed
    with (copy / "export" / "onnx_export.py").open("a") as f:
        f.write("\n# an exporter change\n")
    assert default_model_fingerprint() != committed
