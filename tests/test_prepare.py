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
