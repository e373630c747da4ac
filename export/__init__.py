"""Export a prompt-tuned CLIP to a verified ONNX bundle (and the BentoML model store)."""
from .bundle import Bundle, BundleError, load_bundle, read_manifest, save_to_model_store, verify_bundle
from .onnx_export import ExportParityError, export_bundle

__all__ = ["Bundle", "BundleError", "ExportParityError", "export_bundle", "load_bundle", "read_manifest",
           "save_to_model_store", "verify_bundle"]
