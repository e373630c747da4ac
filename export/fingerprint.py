"""One digest of everything an exported bundle depends on besides its inputs: the code that builds
and traces the model and the libraries that trace and run it. A cached export (the default model in
the BentoML store, the benchmarks' bundles) is stale when this digest changes.

Imports no torch: the benchmarks' parent process, which never loads model code, uses it too.
"""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GRAPH_SOURCES = ("capt/models.py", "capt/prompts.py", "capt/images.py", "capt/checkpoint.py",
                 "export/onnx_export.py", "export/bundle.py")
GRAPH_LIBRARIES = ("torch", "open_clip_torch", "onnx", "onnxscript", "onnxruntime-gpu")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in GRAPH_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def export_fingerprint(*inputs: str | Path, extra: str = "") -> str:
    """sha256 over the ``inputs`` files' contents, ``extra``, the exporter's sources and the library
    versions (hex)."""
    digest = hashlib.sha256(extra.encode())
    for path in [*map(Path, inputs), *(REPO_ROOT / source for source in GRAPH_SOURCES)]:
        digest.update(str(path.name).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    for name, version in sorted(library_versions().items()):
        digest.update(f"{name}=={version}\n".encode())
    return digest.hexdigest()
