"""The ``ssd`` command: one entry point, a subcommand per part of the pipeline.

Subcommands import their part lazily, so that ``ssd serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace


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


def _data_synth(args: argparse.Namespace) -> int:
    from model.data.synth import generate

    out = generate(
        Path(args.out),
        args.format,
        images=args.images,
        val_images=args.val_images,
        seed=args.seed,
        image_size=(args.size, args.size),
    )
    print(f"ssd data synth: wrote {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if "-h" not in args.argv and "--help" not in args.argv:
        # Importing torch and torchvision takes 5 to 15 s on a small machine: say so at once.
        print("ssd train: loading PyTorch ...", file=sys.stderr, flush=True)
    from model import train

    return train.main(args.argv)


def _evaluate(args: argparse.Namespace) -> int:
    """The metrics as one JSON object on stdout (for scripts), and as a table on stderr (for a
    person)."""
    from model.checkpoint import CheckpointError
    from model.data import DatasetError
    from model.data.subsets import fit_classes, open_evaluation_split
    from model.evaluation import table
    from release.evaluate import ClassMismatch
    from service.artifact import ArtifactError

    try:
        dataset = open_evaluation_split(
            args.data, args.split, val_fraction=args.val_fraction, seed=args.seed, images=args.images
        )
        model = _evaluated_model(args)
        dataset, note = fit_classes(dataset, model.classes, model.name)
        if note:
            print(f"ssd evaluate: {note}", file=sys.stderr)
        metrics = model.evaluate(dataset)
    except (DatasetError, CheckpointError, ArtifactError, ClassMismatch, FileNotFoundError) as exc:
        print(f"ssd evaluate: {exc}", file=sys.stderr)
        return 2
    for line in table(metrics):
        print(line, file=sys.stderr)
    print(json.dumps(metrics))
    return 0


def _evaluated_model(args: argparse.Namespace) -> SimpleNamespace:
    """A checkpoint run by PyTorch, or an artifact run as the service runs it: its name, its
    classes, and how it evaluates a dataset."""
    if args.model:
        from release.evaluate import evaluate_detector
        from service.artifact import Detector

        detector = Detector(args.model, args.providers.split(","))
        return SimpleNamespace(
            name=args.model,
            classes=list(detector.info.classes),
            evaluate=lambda dataset: evaluate_detector(detector, dataset, args.batch_size, progress=True),
        )
    import torch

    from model.checkpoint import load_model
    from model.inference import evaluate_model

    network, checkpoint = load_model(args.checkpoint)
    device = torch.device(args.device)
    return SimpleNamespace(
        name=args.checkpoint,
        classes=list(checkpoint["classes"]),
        evaluate=lambda dataset: evaluate_model(
            network.to(device), dataset, batch_size=args.batch_size, workers=args.workers, device=device,
            progress=True,
        ),
    )  # fmt: skip


def _promote(args: argparse.Namespace) -> int:
    from release import promote

    return promote.run(args)


def _labelstudio(args: argparse.Namespace) -> int:
    from release import labelstudio

    return labelstudio.run(args)


def _export(args: argparse.Namespace) -> int:
    from export import cli

    return cli.run(args)


def _predict(args: argparse.Namespace) -> int:
    from service import predict

    return predict.run(args)


def _serve(args: argparse.Namespace) -> int:
    from service import server

    return server.run(args)


def _bench(args: argparse.Namespace) -> int:
    from bench import cli

    return cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd", description="SSD object detection: train, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list the model family with default box and parameter counts")
    models.add_argument("--num-classes", type=int, default=21, help="classes + background (default 21)")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(run=_models)

    data = sub.add_parser("data", help="datasets: write the built-in synthetic one")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_sub.add_parser("synth", help="write the built-in synthetic dataset in a real on-disk format")
    synth.add_argument("--out", required=True, help="folder to write")
    synth.add_argument("--format", choices=["voc", "coco", "yolo"], default="voc")
    synth.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    synth.add_argument(
        "--val-images", type=int, default=None, help="validation images (default 15%% of --images)"
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=320, help="image side in pixels (default 320)")
    synth.set_defaults(run=_data_synth)

    # `ssd train` hands its arguments to model.train, which torchrun can also run as a module.
    train = sub.add_parser("train", help="train a model (see `ssd train --help`)", add_help=False)
    train.set_defaults(run=_train, accepts_any=True)

    evaluate = sub.add_parser(
        "evaluate",
        help="COCO and VOC07 mAP of a checkpoint or an artifact: a table per class on stderr, one JSON "
        "object on stdout",
    )
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a training checkpoint, run by PyTorch")
    what.add_argument(
        "--model", help="an .onnx artifact, run as the service runs it (its decoding, ONNX Runtime)"
    )
    evaluate.add_argument(
        "--data", required=True, help="a VOC root, a COCO instances JSON or a YOLO data.yaml"
    )
    from release.options import add_evaluation_split

    add_evaluation_split(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--workers", type=int, default=0)
    evaluate.add_argument("--device", default="cpu", help="--checkpoint: cpu or cuda")
    evaluate.add_argument("--providers", default="cpu", help="--model: ONNX Runtime's, e.g. cuda,cpu")
    evaluate.set_defaults(run=_evaluate)

    promote = sub.add_parser(
        "promote", help="replace the served artifact with a new one only if it is not worse on the data"
    )
    _configure_lazily(promote, "release.promote")
    promote.set_defaults(run=_promote)

    labelstudio = sub.add_parser(
        "labelstudio", help="Label Studio: a project with the detector as its ML backend; its export"
    )
    _configure_lazily(labelstudio, "release.labelstudio")
    labelstudio.set_defaults(run=_labelstudio)

    # The parsers of export and predict live with their parts; importing those modules is cheap
    # (no torch at parse time for predict, which must run without it).
    export = sub.add_parser("export", help="write the ONNX model artifact, verified against PyTorch")
    _configure_lazily(export, "export.cli")
    export.set_defaults(run=_export)
    predict = sub.add_parser("predict", help="run an ONNX artifact on image files (no torch)")
    _configure_lazily(predict, "service.predict")
    predict.set_defaults(run=_predict)

    serve = sub.add_parser("serve", help="run the detection service (FastAPI + ONNX Runtime)")
    _configure_lazily(serve, "service.server")
    serve.set_defaults(run=_serve)

    bench = sub.add_parser("bench", help="benchmarks: serving, overload, soak, training, export")
    _configure_lazily(bench, "bench.cli")
    bench.set_defaults(run=_bench)
    return parser


def _configure_lazily(parser: argparse.ArgumentParser, module: str) -> None:
    import importlib

    importlib.import_module(module).configure(parser)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    args.argv = argv[argv.index(args.command) + 1 :]
    if unknown and not getattr(args, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
