"""Make sure the model the service will load is in place: ``python -m serving.prepare``.

With ``CAPT_BUNDLE`` set, that folder is verified. Otherwise the BentoML model store must hold
``CAPT_MODEL_TAG`` (default ``capt-default:latest``); if the default is missing, or was exported from
other inputs than those committed under ``models/capt-toy/`` (a pull that changed the default model),
by another version of the exporter, or with other versions of the libraries that trace and run the
graphs, it is exported again (under a minute on 2 CPU cores).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from capt import default_model
from capt.checkpoint import META_FILE, PROMPTS_FILE
from export import BundleError, export_bundle, save_to_model_store, verify_bundle
from export.fingerprint import export_fingerprint


def default_model_fingerprint() -> str:
    """One digest of what the default bundle is exported from and with (``export.fingerprint``)."""
    return export_fingerprint(default_model.BASE_WEIGHTS, default_model.PROMPTS / PROMPTS_FILE,
                              default_model.PROMPTS / META_FILE, extra=default_model.SAMPLE_DATA)


def build_default_bundle() -> str:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_bundle(default_model.PROMPTS, Path(tmp) / "bundle", pretrained=str(default_model.BASE_WEIGHTS),
                                 sample_data=default_model.SAMPLE_DATA)
        tag = save_to_model_store(Path(tmp) / "bundle", default_model.STORE_NAME,
                                  {"source_sha256": default_model_fingerprint()})
    print(f"exported the default model as {tag} in {time.perf_counter() - started:.1f} s "
          f"(parity: max |diff| {manifest['parity']['max_abs_diff']:.1e}, top-1 agreement "
          f"{manifest['parity']['top1_agreement']:.0%})")
    return tag


def main() -> int:
    import bentoml

    if os.environ.get("CAPT_BUNDLE"):
        verify_bundle(os.environ["CAPT_BUNDLE"])
        print(f"bundle {os.environ['CAPT_BUNDLE']} verified")
        return 0
    tag = os.environ.get("CAPT_MODEL_TAG", default_model.STORE_TAG)
    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        if not tag.startswith(f"{default_model.STORE_NAME}:"):
            print(f"model {tag} is not in the BentoML model store (export it with `capt export`)", file=sys.stderr)
            return 2
        build_default_bundle()
        return 0
    if tag == default_model.STORE_TAG and stored.info.metadata.get("source_sha256") != default_model_fingerprint():
        print(f"{stored.tag} was exported from another version of models/capt-toy/, of the exporter or of its "
              "libraries; exporting the committed one")
        build_default_bundle()
        return 0
    try:
        verify_bundle(stored.path)
    except BundleError as err:
        print(f"model {tag} in the store is damaged: {err}. Delete it (bentoml models delete {tag}) and rerun.",
              file=sys.stderr)
        return 2
    print(f"model {tag} verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
