"""The ``capt`` command line: ``capt train``, ``capt eval``, ``capt pretrain``, ``capt replicate``, ``capt promote``,
``capt synthetic-imagenet``, ``capt models``, ``capt methods``; and, registered as ``capt.commands`` entry points (see ``_plugins``),
``capt export`` (from the ``export`` package), ``capt engines`` (the served engine's cache, from ``serving``) and
``capt info``, ``capt robustify``, ``capt curves`` (each defined beside what it runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import list_methods, parse_eps


def _train(args) -> None:
    from .config import TrainConfig
    from .train import train

    overrides = {"epochs": args.epochs, "output_dir": args.output_dir, "device": args.device, "seed": args.seed,
                 "precision": args.precision}
    config = TrainConfig.from_yaml(args.config, overrides)
    run_dir = train(config, resume=args.resume, stop_after_epoch=args.stop_after_epoch, progress=not args.no_progress)
    print(f"checkpoints in {run_dir}")


def _eval(args) -> None:
    import torch

    from .attacks.autoattack import check_attack_names, require_backend
    from .checkpoint import load_prompted_model
    from .config import load_method
    from .data import load_dataset
    from .evaluate import markdown_table, write_results
    from .models import create_clip, pixel_transform
    from .prompts import PromptConfig, PromptedCLIP
    from .train import resolve_device

    attacks = check_attack_names(args.attacks or ["pgd"])
    from .evaluate import check_eval_precision
    check_eval_precision(args.precision, args.eps)  # an explicit bf16/fp16 with attacks is refused before loading
    require_backend(attacks)  # a missing torchattacks is said before the model loads, with the install command
    device = resolve_device(args.device)
    if args.checkpoint:
        model, meta = load_prompted_model(args.checkpoint, pretrained=args.pretrained, device=device)
        source = {"checkpoint": str(args.checkpoint), "method": meta.get("method")}
    else:
        if not args.model:
            raise ValueError("give --checkpoint, or --model (and --pretrained) to evaluate zero-shot CLIP")
        method = load_method(args.method)
        if method.get("trainable", True):
            raise ValueError(f"method '{args.method}' needs trained prompts: pass --checkpoint")
        clip = create_clip(args.model, args.pretrained, device=device, quick_gelu=args.quick_gelu)
        model = PromptedCLIP(clip, PromptConfig.from_dict(method.get("prompt"))).to(device)
        source = {"method": args.method, "model": args.model, "pretrained": args.pretrained}
    transform = pixel_transform(model.preprocess_cfg)
    from .evaluate import evaluate
    results = []
    for spec in args.data:
        data = load_dataset(spec, transform)
        torch.manual_seed(args.seed)
        results.append(evaluate(model, data, args.eps, steps=args.steps, batch_size=args.batch_size,
                                max_samples=args.max_samples, seed=args.seed, progress=not args.no_progress,
                                attacks=attacks, precision=args.precision))
    json_path, md_path = write_results(results, args.output, extra={**source, "attacks": attacks,
                                                                    "precision": results[0]["precision"]})
    print(markdown_table(results), end="")
    print(f"written {json_path} and {md_path}")


def _pretrain(args) -> None:
    from .pretrain import PretrainConfig, pretrain

    values = {k: v for k, v in {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                                "seed": args.seed, "fashion_root": args.fashion_root, "loss": args.loss,
                                "precision": args.precision}.items()
              if v is not None}
    weights = pretrain(PretrainConfig(**values), args.output, resume=args.resume, progress=not args.no_progress)
    print(f"weights in {weights}")


def _replicate(args) -> None:
    from .replicate import GridConfig, run_grid

    overrides = {k: v for k, v in {"model": args.model, "pretrained": args.pretrained, "quick_gelu": args.quick_gelu,
                                   "reference_pretrained": args.reference_pretrained, "methods": args.methods,
                                   "shots": args.shots, "eps": args.eps, "seeds": args.seeds, "epochs": args.epochs,
                                   "max_steps": args.max_steps, "train_data": args.train_data,
                                   "eval_data": args.eval_data, "eval_samples": args.eval_samples,
                                   "cross_samples": args.cross_samples, "pgd_steps": args.pgd_steps,
                                   "headline_eps": args.headline_eps, "headline_samples": args.headline_samples,
                                   "headline_autoattack_samples": args.autoattack_samples,
                                   "eps_curve_samples": args.eps_curve_samples, "ablations": args.ablations,
                                   "ablation_at": args.ablation_eps,
                                   "workers": args.workers, "precision": args.precision,
                                   "eval_templates": args.eval_templates,
                                   "grad_checkpointing": args.grad_checkpointing,
                                   "attacks": args.attacks, "device": args.device}.items() if v is not None}
    if args.steps is not None:
        overrides["steps"] = args.steps or None  # 0: the epochs for every shot count
    if args.pretrained is not None and args.reference_pretrained is None:
        from .models import REPO_ROOT
        from . import default_model
        given = Path(args.pretrained)
        given = given if given.is_absolute() else REPO_ROOT / given
        if given.resolve() != default_model.BASE_WEIGHTS.resolve():
            overrides["reference_pretrained"] = None  # other weights: f_0 is the tuned model's own, prompts off
    grid = GridConfig.quick(**overrides) if args.quick else GridConfig(**overrides)
    run_grid(grid, args.output, progress=not args.no_progress)
    print(f"results in {args.output}/results.md, results.json and *.png")


def _synthetic_imagenet(args) -> None:
    from .data.synthetic import write_synthetic_imagenet
    root = write_synthetic_imagenet(args.root, images_per_class=args.images_per_class,
                                    val_images_per_class=args.val_images_per_class, seed=args.seed,
                                    progress=not args.no_progress)
    print(f"synthetic ImageNet (noise images, for dry runs only) in {root}: use imagenet:{root}:train and "
          f"imagenet:{root}:val")


def _promote(args) -> None:
    from . import default_model
    checkpoint = default_model.promote(args.run_dir)
    print(f"the default prompts ({default_model.PROMPTS}) are now those of {checkpoint}")


def _models(args) -> None:
    from .models import list_models
    print("\n".join(list_models()))


def _methods(args) -> None:
    print("\n".join(list_methods()))


def _add_precision_option(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    from .hardware import MIN_PRECISION_GAIN, PRECISIONS
    p.add_argument("--precision", choices=list(PRECISIONS), default=default,
                   help=f"auto (default: on a CPU with native bf16 (AVX512_BF16 or AMX-BF16) bf16 autocast where one "
                        f"timed step of the model runs {MIN_PRECISION_GAIN:g}x faster in it, untimed work bf16 only with AMX; on a GPU "
                        f"bf16 from compute capability 8.0 and fp16 below; fp32 elsewhere; `capt info` says which), "
                        f"fp32, bf16 or fp16: {what}")


def _add_attack_option(p: argparse.ArgumentParser) -> None:
    from .attacks.autoattack import EVAL_ATTACKS
    p.add_argument("--attack", dest="attacks", action="extend", nargs="+", choices=list(EVAL_ATTACKS),
                   metavar="ATTACK",
                   help="evaluation attacks, repeatable or a list (default: pgd): pgd (PGD, step eps/4, random start, "
                        "CE), apgd-ce, apgd-t (targeted DLR), fab-t, square (black-box, 5000 queries), autoattack "
                        "(APGD-CE, APGD-T, FAB-T, Square, each on the images still correct); robust accuracy per "
                        "attack and the worst case over them; with Square (alone or in autoattack) the table also "
                        "says whether gradient masking is suspected")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="adversarial prompt tuning (CAPT and its baselines)")
    p.add_argument("--config", required=True, help="YAML run config (see capt/configs/)")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--resume", action="store_true", help="continue from the output_dir's latest checkpoint")
    p.add_argument("--stop-after-epoch", type=int, help="stop after this epoch (resume later with --resume)")
    _add_precision_option(p, "the training step's autocast, its PGD included (overrides the config's precision: "
                             "a legacy amp: true means bf16 on CUDA, fp32 on CPU); the run records the precision used "
                             "and --resume refuses another")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="clean and robust accuracy (PGD, APGD, FAB, Square, AutoAttack), in-distribution and cross-dataset")
    p.add_argument("--checkpoint", help="prompt checkpoint directory, or a run directory (its latest)")
    p.add_argument("--method", default="zeroshot", help="without --checkpoint: an untrained method (zeroshot)")
    p.add_argument("--model", help="without --checkpoint: model name")
    p.add_argument("--pretrained", help="pretrained tag or local file (overrides the checkpoint's)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="without --checkpoint: build the model with QuickGELU (OpenAI weights from a local file); "
                        "default: what the pretrained tag or the model name says")
    p.add_argument("--data", action="append", required=True,
                   help="dataset spec name:root[:split], repeatable (e.g. imagefolder:data/test, cifar10:/data:test)")
    p.add_argument("--eps", type=parse_eps, nargs="*", default=[1 / 255, 4 / 255], help="e.g. 1/255 4/255; none for clean accuracy only")
    p.add_argument("--steps", type=int, default=100, help="PGD steps (step size eps/4)")
    _add_attack_option(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, help="evaluate a seeded random subset of this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default="results", help="directory for results.json and results.md")
    _add_precision_option(p, "clean-only evaluations (--eps with no value) run their forward passes in it; whenever an "
                             "attack runs, every pass is fp32 (a reduced-precision attack is weaker and would overstate "
                             "robustness), so auto then means fp32 and an explicit bf16/fp16 is refused", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_eval)

    p = sub.add_parser("pretrain", help="contrastive pretraining of a small CLIP on the toy world (+ Fashion-MNIST)")
    p.add_argument("--output", required=True, help="folder for weights.safetensors, metrics and resumable state")
    p.add_argument("--model", help="model config (default capt-toy-vit)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--fashion-root", help="Fashion-MNIST idx files ('' to leave them out)")
    _add_precision_option(p, "autocast of the pretraining step (default auto; recorded in pretrain_config.json)")
    p.add_argument("--loss", choices=["multi_positive", "clip"],
                   help="multi_positive (default): a caption is a positive for every image in the batch it is true of; "
                        "clip: open_clip's ClipLoss, one positive each")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_pretrain)

    p = sub.add_parser("replicate", help="methods x shots x eps x seeds, in-distribution and cross-dataset")
    p.add_argument("--quick", action="store_true", help="a few minutes: 4 shots, eps 1/255, one seed, PGD-10")
    p.add_argument("--output", default="results/replicate")
    p.add_argument("--model")
    p.add_argument("--pretrained")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="QuickGELU for a local file of OpenAI weights (default: what the tag or model name says)")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--shots", type=int, nargs="+")
    p.add_argument("--eps", type=parse_eps, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--epochs", type=int, help="epochs per run when --steps is 0")
    p.add_argument("--steps", type=int, help="optimiser steps per run for every shot count (default 30; epochs = "
                   "ceil(steps / steps per epoch), at least 2); 0: --epochs for every shot count")
    p.add_argument("--max-steps", type=int, help="stop every run after this many steps (a dry run of a protocol)")
    p.add_argument("--reference-pretrained", help="the frozen CLIP of CAPT's consistency term (default: the original "
                   "toy CLIP on the default robust backbone, else the tuned weights)")
    p.add_argument("--train-data", help="dataset spec to tune on (default: the toy world's pairs)")
    p.add_argument("--eval-data", nargs="+", help="dataset specs; the first is in-distribution")
    p.add_argument("--eval-samples", type=int, help="in-distribution images per cell (default 200)")
    p.add_argument("--cross-samples", type=int, help="images per cross-dataset set per cell (default 64)")
    p.add_argument("--pgd-steps", type=int, help="PGD steps of every cell's evaluation (default 10)")
    p.add_argument("--headline-eps", type=parse_eps, nargs="*",
                   help="eps of the headline cells (largest shot count): PGD-100, AutoAttack and the eps curve "
                        "(default 2/255; none: no headline cells and no ablations)")
    p.add_argument("--headline-samples", type=int, help="images of the headline PGD-100 (default 100)")
    p.add_argument("--autoattack-samples", type=int, help="images of the headline AutoAttack (default 100)")
    p.add_argument("--eps-curve-samples", type=int, help="images per eps of the eps curve (default 100)")
    p.add_argument("--ablations", nargs="*", help="ablations of CAPT to run (default: all; none: no ablations)")
    p.add_argument("--ablation-eps", type=parse_eps, nargs="+",
                   help="eps at which the ablations run (default: the first headline eps)")
    p.add_argument("--workers", type=int, help="processes running cells side by side on a CPU (default 2)")
    p.add_argument("--eval-templates", nargs="+", metavar="TEMPLATE",
                   help="templates of every evaluation set instead of each dataset's own (e.g. 'a photo of a {}.')")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute transformer blocks in the backward pass: far less memory for large label sets")
    _add_precision_option(p, "training (evaluation attacks are always fp32)", default=None)
    _add_attack_option(p)
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_replicate)

    p = sub.add_parser("synthetic-imagenet", help="write an ImageNet-shaped folder of noise images (1000 WordNet ids) "
                       "for a dry run of the paper's protocol")
    p.add_argument("root", help="a new or empty folder")
    p.add_argument("--images-per-class", type=int, default=16)
    p.add_argument("--val-images-per-class", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_synthetic_imagenet)

    p = sub.add_parser("promote", help="make a training run's latest prompts the embedded default model's")
    p.add_argument("run_dir", metavar="run", help="run directory (e.g. runs/capt-default) or checkpoint directory")
    p.set_defaults(run=_promote)

    sub.add_parser("models", help="list model names").set_defaults(run=_models)
    sub.add_parser("methods", help="list methods").set_defaults(run=_methods)
    return parser


PLUGIN_GROUP = "capt.commands"


def _plugins() -> list:
    """Sub-commands registered as entry points of the ``capt.commands`` group, each
    ``register(subparsers) -> tuple of its user-facing error types``. Plugged in rather than imported,
    so that ``capt`` does not depend on the packages built on it (``export`` adds ``capt export``),
    and so that a command's options live with the module that runs it (``capt.robustify``)."""
    from importlib.metadata import entry_points
    return list(entry_points(group=PLUGIN_GROUP))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    user_errors: tuple[type[BaseException], ...] = ()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for plugin in _plugins():
        user_errors += tuple(plugin.load()(subparsers))
    args = parser.parse_args(argv)

    from .data import DataUnavailable
    from .images import UnreadableImage
    from .models import PretrainedUnavailable
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, DataUnavailable, PretrainedUnavailable, UnreadableImage,
            *user_errors) as err:
        print(f"capt: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
