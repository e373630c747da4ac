"""``capt export``: plugged into the ``capt`` command line through the ``capt.commands`` entry
point (pyproject.toml), so that ``capt`` does not import the package built on top of it."""
from __future__ import annotations


def _export(args) -> None:
    from . import export_bundle, save_to_model_store

    manifest = export_bundle(args.checkpoint, args.output, pretrained=args.pretrained, labels=args.labels,
                             sample_data=args.sample_data, opset=args.opset, precision=args.precision)
    parity = manifest["parity"]
    print(f"exported {args.output} ({args.precision}) in {manifest['export_seconds']} s: max |onnx - torch| {parity['max_abs_diff']:.2e}, "
          f"top-1 agreement {parity['top1_agreement']:.0%} on {parity['top1_samples']} {parity['sample']} images")
    if args.model_name:
        print(f"saved to the BentoML model store as {save_to_model_store(args.output, args.model_name)}")


def register(subparsers) -> tuple[type[BaseException], ...]:
    """Adds ``export`` to the ``capt`` sub-commands; returns the errors to report as ``capt: error:``."""
    from .bundle import BundleError
    from .onnx_export import PRECISIONS, ExportParityError

    p = subparsers.add_parser("export", help="ONNX bundle of a prompt checkpoint, parity-checked, into the BentoML model store")
    p.add_argument("--checkpoint", required=True, help="prompt checkpoint directory, or a run directory (its latest)")
    p.add_argument("--output", required=True, help="bundle folder to create")
    p.add_argument("--pretrained", help="the base weights, if not where the checkpoint says")
    p.add_argument("--labels", nargs="+", help="label set for the top-1 parity check (default: the training labels)")
    p.add_argument("--sample-data", help="dataset spec of real images for the top-1 parity check (default: synthetic)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp16 halves the graphs for GPUs (parity bar 2e-3, top-1 agreement >= 98%%)")
    p.add_argument("--model-name", default="",
                   help="also save the bundle into the BentoML model store under this name (serve it with "
                        "CAPT_MODEL_TAG=<name>:latest)")
    p.set_defaults(run=_export)
    return BundleError, ExportParityError
