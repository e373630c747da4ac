"""Make sure the model the service will load is in place: ``python -m serving.prepare``.

With ``CAPT_BUNDLE`` set, that folder is verified. Otherwise the BentoML model store must hold
``CAPT_MODEL_TAG`` (default ``capt-default:latest``); if the default is missing, or was exported from
other weights or prompts than those committed under ``models/capt-toy/`` (a pull that changed the
default model), it is exported again from them (under a minute on 2 CPU cores).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from capt.models import REPO_ROOT
from capt.checkpoint import META_FILE, PROMPTS_FILE
from export import BundleError, export_bundle, save_to_model_store, verify_bundle
from export.bundle import sha256_of

DEFAULT_NAME = "capt-default"
DEFAULT_WEIGHTS = REPO_ROOT / "models" / "capt-toy" / "weights.safetensors"
DEFAULT_PROMPTS = REPO_ROOT / "models" / "capt-toy" / "prompts"


def default_model_fingerprint() -> str:
    """One digest of the committed weights and prompts the default bundle is exported from."""
    digest = hashlib.sha256()
    for path in (DEFAULT_WEIGHTS, DEFAULT_PROMPTS / PROMPTS_FILE, DEFAULT_PROMPTS / META_FILE):
        digest.update(sha256_of(path).encode())
    return digest.hexdigest()


def build_default_bundle() -> str:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_bundle(DEFAULT_PROMPTS, Path(tmp) / "bundle", pretrained=str(DEFAULT_WEIGHTS),
                                 sample_data="toyworld_pairs::test")
        tag = save_to_model_store(Path(tmp) / "bundle", DEFAULT_NAME, {"source_sha256": default_model_fingerprint()})
    print(f"exported the default model as {tag} in {time.perf_counter() - started:.1f} s "
          f"(parity: max |diff| {manifest['parity']['max_abs_diff']:.1e}, top-1 agreement "
          f"{manifest['parity']['top1_agreement']:.0%})")
    return tag


def promote(run_dir: str) -> None:
    """Copy a run's latest prompts into ``models/capt-toy/prompts`` as the embedded default."""
    import json
    import shutil

    from capt.checkpoint import resolve_checkpoint
    checkpoint = resolve_checkpoint(run_dir)
    DEFAULT_PROMPTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint / PROMPTS_FILE, DEFAULT_PROMPTS / PROMPTS_FILE)
    meta = json.loads((checkpoint / META_FILE).read_text())
    meta["pretrained"] = str(DEFAULT_WEIGHTS.relative_to(REPO_ROOT))  # portable: resolved inside the repo
    (DEFAULT_PROMPTS / META_FILE).write_text(json.dumps(meta, indent=2))
    print(f"default prompts now from {checkpoint}")


def main() -> int:
    import bentoml

    if len(sys.argv) == 3 and sys.argv[1] == "--promote":
        promote(sys.argv[2])
        return 0
    if os.environ.get("CAPT_BUNDLE"):
        verify_bundle(os.environ["CAPT_BUNDLE"])
        print(f"bundle {os.environ['CAPT_BUNDLE']} verified")
        return 0
    tag = os.environ.get("CAPT_MODEL_TAG", f"{DEFAULT_NAME}:latest")
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        if not tag.startswith(f"{DEFAULT_NAME}:"):
            print(f"model {tag} is not in the BentoML model store (export it with `capt export`)", file=sys.stderr)
            return 2
        build_default_bundle()
        return 0
    path = stored.path
    if tag == f"{DEFAULT_NAME}:latest" and stored.info.metadata.get("source_sha256") != default_model_fingerprint():
        print(f"{stored.tag} was exported from another version of models/capt-toy/; exporting the committed one")
        build_default_bundle()
        return 0
    try:
        verify_bundle(path)
    except BundleError as err:
        print(f"model {tag} in the store is damaged: {err}. Delete it (bentoml models delete {tag}) and rerun.",
              file=sys.stderr)
        return 2
    print(f"model {tag} verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
