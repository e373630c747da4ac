"""The exported bundle: a folder of files listed, with their sha256, in ``manifest.json``.

A bundle is only used after :func:`verify_bundle` has checked every file, so a truncated copy or a
tampered graph is refused with a message that names the file.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "capt-bundle/1"
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class BundleError(RuntimeError):
    """A bundle is incomplete, tampered with or of an unknown format."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing (not an exported bundle)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: unknown format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    return manifest


def verify_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for name, expected in manifest["files"].items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise BundleError(f"{bundle_dir / MANIFEST}: file entry '{name}' is not a plain file name")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        if sha256_of(path) != expected:
            raise BundleError(f"{path}: sha256 does not match the manifest (corrupted or tampered)")
    return manifest


def save_to_model_store(bundle_dir: str | Path, name: str, metadata: dict | None = None) -> str:
    """Copy a verified bundle into the BentoML model store; returns the model tag. ``metadata`` is
    recorded beside the manifest's summary."""
    import bentoml

    if not _MODEL_NAME.match(name):
        raise ValueError(f"model name '{name}' must be lower-case letters, digits, '.', '_' or '-'")
    manifest = verify_bundle(bundle_dir)
    # BentoML metadata takes no None values.
    summary = {key: manifest[key] if manifest[key] is not None else "none"
               for key in ("format", "model", "pretrained", "method", "opset", "precision")}
    summary["parity_max_abs_diff"] = manifest["parity"]["max_abs_diff"]
    summary["files"] = manifest["files"]
    summary.update(metadata or {})
    with bentoml.models.create(name, module="export", labels={"format": "onnx"}, metadata=summary) as model_ref:
        for file in [MANIFEST, *manifest["files"]]:
            shutil.copy2(Path(bundle_dir) / file, Path(model_ref.path) / file)
    verify_bundle(model_ref.path)
    return str(model_ref.tag)


def bundle_path_from_store(tag: str) -> Path:
    """The verified folder of a bundle in the BentoML model store."""
    import bentoml

    path = Path(bentoml.models.get(tag).path)
    verify_bundle(path)
    return path
