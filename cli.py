"""The ``ssd`` command: one entry point, a subcommand per part of the pipeline.

Subcommands import their part lazily, so that ``ssd serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

NOT_BUILT = 2  # exit code of a subcommand that a later issue builds


def _not_built(name: str) -> int:
    print(f"ssd {name}: not built yet", file=sys.stderr)
    return NOT_BUILT


def _models(args: argparse.Namespace) -> int:
    from model import MODELS, build_model

    rows = []
    for name, spec in MODELS.items():
        net = build_model(name, args.num_classes)
        rows.append(
            {
                "name": name,
                "input_size": list(spec.input_size),
                "default_boxes": net.num_priors,
                "feature_maps": [list(s) for s in net.feature_sizes],
                "parameters": sum(p.numel() for p in net.parameters()),
                "torchvision_weights": spec.torchvision_name is not None,
                "description": spec.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['name']:32} {r['input_size'][0]}x{r['input_size'][1]}  {r['default_boxes']:6d} boxes  "
                f"{r['parameters'] / 1e6:5.1f}M params  {r['description']}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="SSD object detection: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list the model family with default box and parameter counts")
    models.add_argument("--num-classes", type=int, default=21, help="classes + background (default 21)")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(run=_models)

    # Built by later issues; each parser keeps its contract name so that `ssd --help` lists it.
    for name, text in [
        ("data", "write the built-in synthetic dataset"),
        ("train", "train a model"),
        ("evaluate", "COCO and VOC07 mAP of a checkpoint"),
        ("export", "write the ONNX model artifact"),
        ("predict", "run an ONNX artifact on images"),
        ("serve", "run the detection service"),
        ("bench", "benchmarks"),
    ]:
        p = sub.add_parser(name, help=f"{text} (not built yet)", add_help=False)
        p.set_defaults(run=lambda args, name=name: _not_built(name), accepts_any=True)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
