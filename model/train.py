"""Training, in one file: read it top to bottom to see the whole loop.

    ssd train --model ssdlite320_mobilenet_v3_large --data DATA --epochs 30 --out runs/demo
    torchrun --nproc_per_node 4 -m model.train --model ssd300_vgg16 --data VOC --device cuda --amp

One process, or one per GPU (or CPU, with the gloo backend) under torchrun: the existing engine,
no launcher of our own. ``--batch-size`` is per process; the learning rate of a recipe is given
for a reference batch and scaled linearly to the global batch, unless ``--lr`` sets it.

Each epoch: augmented batches -> network -> MultiBox loss -> SGD step (with warm-up, then a
cosine or multi-step schedule), then evaluation on the validation split, then ``last.pt`` (and
``best.pt`` when the validation mAP improves), written atomically. ``--resume`` continues from
``last.pt`` exactly: the weights after two epochs in one run equal those after one epoch plus
one resumed (tested).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import defaults
from .build import build_model
from .checkpoint import (
    CheckpointError,
    atomic_save,
    check_fits,
    read_checkpoint,
    rng_state,
    set_rng_state,
    training_state,
)
from .config import Recipe
from .data import DatasetError, DetectionDataset
from .data.subsets import TrainingSplits, open_training_splits, parse_classes
from .data.summary import Summary
from .inference import evaluate_model
from .loss import MultiBoxLoss
from .malloc import keep_freed_memory
from .registry import MODELS, ModelSpec
from .transforms import collate, train_transforms
from .weights import WeightsError

log = logging.getLogger("ssd.train")
PROGRESS_AFTER_S = 5.0  # a phase that lasts longer shows a progress bar (tqdm's delay)


@dataclass
class TrainConfig:
    """What ``ssd train`` takes; a None (or "auto") is resolved for the run by model/defaults.py."""

    data: str
    model: str = defaults.MODEL
    out: str = "runs/train"
    epochs: int = 30
    batch_size: int | None = None  # per process; None: 32, less for a small dataset
    lr: float | None = None  # None: the recipe's, scaled to the global batch (SGD); 1e-3 x batch/32 (AdamW)
    optimizer: str = "sgd"  # sgd (the papers' recipes) or adamw (converges faster on short schedules)
    momentum: float = 0.9
    weight_decay: float | None = None  # None: the recipe's; never applied to norms and biases
    schedule: str | None = None  # cosine | multistep; None: the recipe's
    warmup_iters: int | None = None  # linear warm-up from lr/1000; None: 5% of the run's steps
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    amp: bool = False
    workers: int = min(4, os.cpu_count() or 1)
    seed: int = 0
    resume: bool = False
    freeze_backbone: bool = False
    backbone_weights: str = "auto"  # "auto", "recipe", "imagenet", "none" or a file
    scale_set: str | None = None
    train_split: str | None = None  # None: "train", or the data's only split
    val_split: str | None = None  # None: "val", or a share held out of the training split
    val_fraction: float = defaults.VAL_FRACTION  # held out where the data has no validation split
    classes: str | None = None  # comma-separated: train on these classes only, in this order
    images: str | None = None  # COCO: the image folder, when not beside the JSON
    photometric: bool | None = None  # None: the recipe's
    zoom_out: bool | None = None
    log_every: int = 20  # steps between TensorBoard points
    # Batches to recompute batch-norm statistics on before each validation (0: off); None: 16
    # where the model has batch norm.
    precise_bn: int | None = None
    # Stop after this many epochs of this run; the schedule stays that of ``epochs``.
    stop_after: int | None = None
    # Fine-tune: start from this checkpoint's weights with a fresh optimizer and schedule.
    init_from: str | None = None


class TrainError(Exception):
    """A run that cannot start as configured; the message says why (``ssd train`` exits 2)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept (``ssd train`` exits 1)."""


@dataclass
class Processes:
    """Where this process trains: ``world`` processes under torchrun, this one ``rank``."""

    device: torch.device
    distributed: bool
    world: int
    rank: int
    amp: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes(config: TrainConfig) -> Processes:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when there is one."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    amp = config.amp and device.type == "cuda"
    if config.amp and not amp:
        log.warning("--amp needs CUDA; training in float32 on %s", device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: the fastest kernels are worth the search
    return Processes(device, distributed, world, rank, amp)


def open_splits(config: TrainConfig, spec: ModelSpec, log_summary: bool) -> TrainingSplits:
    """The training split (augmented) and the validation split (None: validation is off)."""
    recipe = spec.recipe
    augment = train_transforms(
        spec.input_size,
        photometric=recipe.photometric if config.photometric is None else config.photometric,
        zoom_out=recipe.zoom_out if config.zoom_out is None else config.zoom_out,
        fill=spec.image_mean,
    )
    splits = open_training_splits(
        config.data,
        config.train_split,
        config.val_split,
        val_fraction=config.val_fraction,
        seed=config.seed,
        images=config.images,
        classes=parse_classes(config.classes) if config.classes else None,
        transform=augment,
    )
    if log_summary:
        part = f"split {splits.train_split!r}" if splits.train_split else "its one split"
        if splits.val_fraction:
            part += ", less the share held out"
        for line in Summary.of(splits.train, f"{config.data} [{part}]", "train").lines():
            log.info("%s", line)
        if splits.dropped:
            shown = ", ".join(f"{name} {n}" for name, n in splits.dropped.most_common(5))
            more = len(splits.dropped) - 5
            log.info(
                "  left out by --classes: %d objects of %d classes (%s%s)",
                sum(splits.dropped.values()),
                len(splits.dropped),
                shown,
                f", and {more} more classes" if more > 0 else "",
            )
        if splits.val is None:
            log.warning("no validation (%s): best.pt will follow last.pt", splits.validation)
        else:
            for line in Summary.of(splits.val, f"validation: {splits.validation}", "val").lines():
                log.info("%s", line)
    return splits


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and L2Norm's scale (every parameter of rank <= 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, config: TrainConfig, recipe: Recipe, lr: float
) -> tuple[torch.optim.Optimizer, float]:
    """SGD with momentum as the papers (or AdamW), and the weight decay it got."""
    if config.optimizer == "adamw":
        weight_decay = 0.05 if config.weight_decay is None else config.weight_decay
        return torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=lr), weight_decay
    weight_decay = recipe.weight_decay if config.weight_decay is None else config.weight_decay
    sgd = torch.optim.SGD(_parameter_groups(model, weight_decay), lr=lr, momentum=config.momentum)
    return sgd, weight_decay


def _lr_factor(step: int, total: int, warmup: int, schedule: str, milestones: Sequence[float]) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` of ``total``."""
    warm = 1.0 if step >= warmup else 1e-3 + (1 - 1e-3) * step / warmup
    if schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return warm * 0.1 ** sum(step >= int(m * total) for m in milestones)


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Precise BN: batch-norm running statistics as the plain average over ``batches``.

    Running averages with a small momentum (SSDlite's 0.03) lag weights that still move fast; in
    a short run, the model evaluated with them scored half of what the same weights scored with
    recomputed statistics (mAP@0.5 0.047 against 0.103 after 3 epochs on the synthetic set).
    """
    norms = batch_norms(model)
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for images in batches:
        model(images)
    model.train(was_training)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _write_plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train"]["loss"] for h in history], label="total")
    left.plot(epochs, [h["train"]["regression"] for h in history], label="regression")
    left.plot(epochs, [h["train"]["classification"] for h in history], label="classification")
    left.set(xlabel="epoch", ylabel="training loss", title="Loss")
    left.legend()
    with_val = [h for h in history if h.get("val")]
    for key, label in [("map50", "mAP@0.5"), ("map", "mAP@[.5:.95]"), ("voc07_map", "VOC07 mAP")]:
        right.plot([h["epoch"] for h in with_val], [h["val"][key] for h in with_val], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="validation", title="Validation mAP", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig) -> Path:
    """Train as configured; returns the run folder.

    Raises TrainError (a run that cannot start as configured), DatasetError, CheckpointError
    and TrainingDiverged; ``main()`` turns them into messages and exit codes.
    """
    keep_freed_memory()  # see malloc.py: more than halves a CPU training step here
    if config.model not in MODELS:
        raise TrainError(f"unknown model {config.model!r}; known: {', '.join(MODELS)}")
    for name in ("epochs", "batch_size", "warmup_iters", "precise_bn", "lr"):
        value = getattr(config, name)
        if value is not None and (value < 0 or (value == 0 and name in ("epochs", "batch_size"))):
            raise TrainError(f"--{name.replace('_', '-')} {value}: must be positive")
    procs = start_processes(config)
    device, world = procs.device, procs.world
    run = Path(config.out)
    torch.manual_seed(config.seed + procs.rank)
    spec = MODELS[config.model]
    recipe = spec.recipe

    # ---- data, model and what the defaults become for them -----------------------------------
    splits = open_splits(config, spec, log_summary=procs.main)
    train_set, val_set = splits.train, splits.val
    classes = train_set.classes
    restart, start = _checkpoints(config, run, classes)
    from_checkpoint = restart or start
    weights, pretrained_layout = _starting_weights(config, spec, len(train_set), restart, start)
    model = build_model(
        config.model,
        len(classes) + 1,
        backbone_weights=None if from_checkpoint else weights.value,
        freeze_base=config.freeze_backbone,
        scale_set=config.scale_set,
        pretrained_layout=pretrained_layout,
    ).to(device)
    plan = defaults.plan(config, recipe, len(train_set), world, bool(batch_norms(model)), weights)
    batch_size = plan.batch_size.value
    if len(train_set) < batch_size * world:
        raise TrainError(
            f"{len(train_set)} training images cannot fill one batch of {batch_size} x {world} processes"
        )
    if procs.main:
        log.info("what the defaults became for this run (a flag given wins):")
        for line in plan.table():
            log.info("  %s", line)
    model.use_channels_last()
    grid = model.prior_grid
    loss_fn = MultiBoxLoss()
    optimizer, weight_decay = make_optimizer(model, config, recipe, plan.lr.value)
    schedule = config.schedule or recipe.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: _lr_factor(step, plan.total_steps, plan.warmup.value, schedule, recipe.milestones),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=procs.amp)
    net = (
        nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if procs.distributed
        else model
    )

    # ---- fine-tune or resume -------------------------------------------------------------------
    start_epoch, best_map, history = 0, -1.0, []
    if start is not None:
        model.load_state_dict(start["model"])
        log.info("starting from the weights of %s (epoch %d)", config.init_from, start["epoch"])
    if restart is not None:
        start_epoch, best_map, history = _restore(restart, model, optimizer, scheduler, scaler, procs.rank)
        log.info("resumed %s at epoch %d", run / "last.pt", start_epoch)

    writer = None
    if procs.main:
        run.mkdir(parents=True, exist_ok=True)
        _write_settings(run / "config.yaml", config, plan, world, weight_decay, schedule, splits)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run / "tensorboard")

    # ---- the loop ----------------------------------------------------------------------------
    from tqdm import tqdm

    run_started = time.perf_counter()

    for epoch in range(start_epoch, config.epochs):
        # Data order and worker seeds from (seed, epoch): the same after a resume.
        order = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        if procs.distributed:
            sampler = DistributedSampler(
                train_set, world, procs.rank, shuffle=True, seed=config.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(train_set, generator=order)
        loader = DataLoader(
            train_set,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=config.workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            drop_last=True,
            generator=order,
        )
        net.train()
        totals = torch.zeros(3)
        seen, started = 0, time.perf_counter()
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not procs.main, dynamic_ncols=True
        )
        for step, (images, boxes, labels, _) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            boxes, labels = boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=procs.amp):
                cls_logits, regression = net(images)
            parts = loss_fn(cls_logits.float(), regression.float(), grid, boxes, labels)
            if not torch.isfinite(parts.total):
                raise TrainingDiverged(
                    f"the loss became {parts.total.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(regression {parts.regression.item():.4g}, classification "
                    f"{parts.classification.item():.4g}). The last good checkpoint is kept: "
                    f"{run / 'last.pt'}. Try a lower --lr or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts.total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            totals += torch.stack(
                [parts.total.detach(), parts.regression.detach(), parts.classification.detach()]
            ).cpu()
            seen += len(images) * world
            rate = seen / (time.perf_counter() - started)
            current_lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{parts.total.item():.3f}", lr=f"{current_lr:.2e}", img_s=f"{rate:.1f}")
            global_step = epoch * plan.steps_per_epoch + step
            if writer is not None and global_step % config.log_every == 0:
                writer.add_scalar("train/loss", parts.total.item(), global_step)
                writer.add_scalar("train/lr", current_lr, global_step)
                writer.add_scalar("train/images_per_s", rate, global_step)
        bar.close()
        elapsed = time.perf_counter() - started
        steps = step + 1
        record = {
            "epoch": epoch + 1,
            "train": dict(
                zip(("loss", "regression", "classification"), (totals / steps).tolist(), strict=True)
            ),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / elapsed,
            "epoch_time_s": elapsed,
        }

        # ---- validation and checkpoints (first process) ------------------------------------
        metrics = None
        if procs.main:
            if plan.precise_bn.value > 0:
                _recompute_statistics(
                    model, train_set, batch_size, plan.precise_bn.value, config, epoch, device
                )
            if val_set is not None:
                metrics = evaluate_model(  # a bar once it has lasted 5 s: a validation can take a minute
                    model,
                    val_set,
                    batch_size=batch_size,
                    workers=config.workers,
                    device=device,
                    progress=True,
                )
                record["val"] = metrics
                log.info(
                    "epoch %d: loss %.4f, val mAP %.4f, mAP@.5 %.4f",
                    epoch + 1,
                    record["train"]["loss"],
                    metrics["map"],
                    metrics["map50"],
                )
        # Wall time including validation, summed over resumed runs: the x axis of a convergence curve.
        record["wall_time_s"] = (history[-1].get("wall_time_s", 0.0) if history else 0.0) + (
            time.perf_counter() - started
        )
        history.append(record)
        improved = metrics is None or metrics["map"] > best_map
        if metrics is not None and improved:
            best_map = metrics["map"]
        rngs = [rng_state()]
        if procs.distributed:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if procs.main:
            state = training_state(
                model,
                model_name=config.model,
                classes=classes,
                scale_set=config.scale_set,
                pretrained_layout=pretrained_layout,
                epoch=epoch + 1,
                config=dataclasses.asdict(config),
                metrics=metrics,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                best_map=best_map,
                rng=rngs,
                history=history,
            )
            _save_epoch(run, state, improved, record, writer)
        if procs.distributed:
            dist.barrier()
        if config.stop_after is not None and epoch + 1 - start_epoch >= config.stop_after:
            break

    if procs.main:
        writer.close()
        _write_plot(history, run / "curves.png")
        for line in closing_summary(config, run, history, splits, time.perf_counter() - run_started):
            print(line)
    if procs.distributed:
        dist.destroy_process_group()
    return run


def _checkpoints(
    config: TrainConfig, run: Path, classes: list[str]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The checkpoint to resume (``RUN/last.pt``) and the one to fine-tune from (``--init-from``,
    ignored when resuming), each checked to be of this model, classes and scale set."""
    restart = start = None
    if config.resume:
        restart = read_checkpoint(run / "last.pt")
        check_fits(restart, run / "last.pt", config.model, classes, config.scale_set, "--resume")
    elif config.init_from:
        start = read_checkpoint(Path(config.init_from))
        check_fits(start, config.init_from, config.model, classes, config.scale_set, "--init-from")
    return restart, start


def _starting_weights(
    config: TrainConfig,
    spec: ModelSpec,
    images: int,
    restart: dict[str, Any] | None,
    start: dict[str, Any] | None,
) -> tuple[defaults.Setting, bool]:
    """Where the weights come from, and whether the backbone has its pretrained layout. A
    checkpoint's weights replace the starting ones, so none are fetched then."""
    if restart or start:
        source = str(Path(config.out) / "last.pt") if restart else str(config.init_from)
        weights = defaults.Setting(source, "--resume" if restart else "--init-from")
        return weights, bool((restart or start).get("pretrained_layout", False))
    weights = defaults.starting_weights(config.backbone_weights, spec.recipe, spec.backbone, images)
    return weights, weights.value is not None


def _restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    rank: int,
) -> tuple[int, float, list[dict[str, Any]]]:
    """Load a resumed run's state; returns its completed epochs, best mAP and history."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state["epoch"], state["best_map"], state.get("history", [])


def _save_epoch(
    run: Path, state: dict[str, Any], improved: bool, record: dict[str, Any], writer: Any
) -> None:
    """last.pt (and best.pt), the metrics.jsonl line and the TensorBoard points of one epoch."""
    atomic_save(state, run / "last.pt")
    if improved:
        atomic_save(state, run / "best.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    epoch = record["epoch"]
    for key, value in record["train"].items():
        writer.add_scalar(f"epoch/{key}", value, epoch)
    for key in ("map", "map50", "map75", "voc07_map"):
        if "val" in record:
            writer.add_scalar(f"val/{key}", record["val"][key], epoch)


def _recompute_statistics(
    model: nn.Module,
    train_set: DetectionDataset,
    batch_size: int,
    batches: int,
    config: TrainConfig,
    epoch: int,
    device: torch.device,
) -> None:
    """Precise BN on ``batches`` augmented training batches, drawn from (seed, epoch)."""
    sample = torch.Generator().manual_seed(config.seed * 1000 + epoch + 500)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        num_workers=config.workers,
        collate_fn=collate,
        sampler=RandomSampler(train_set, generator=sample),
        generator=sample,
    )
    from tqdm import tqdm

    # Augmenting and running 256 images takes a minute on a CPU: a bar once it has lasted a while.
    chosen = tqdm(
        itertools.islice(loader, batches),
        total=min(batches, len(loader)),
        desc="batch-norm statistics",
        unit="batch",
        file=sys.stderr,
        delay=PROGRESS_AFTER_S,
        leave=False,
    )
    recompute_batch_norm(model, (images.to(device) for images, *_ in chosen))


def _write_settings(
    path: Path,
    config: TrainConfig,
    plan: defaults.Plan,
    world: int,
    weight_decay: float,
    schedule: str,
    splits: TrainingSplits,
) -> None:
    """config.yaml: the options as given, then what each default became (``*_effective``)."""
    import yaml

    settings = dataclasses.asdict(config) | {
        "classes": splits.train.classes,
        "classes_given": config.classes,
        "world_size": world,
        "batch_size_effective": plan.batch_size.value,
        "lr_effective": plan.lr.value,
        "warmup_iters_effective": plan.warmup.value,
        "precise_bn_effective": plan.precise_bn.value,
        "backbone_weights_effective": plan.backbone_weights.value,
        "weight_decay_effective": weight_decay,
        "schedule_effective": schedule,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "why": {
            "batch_size": plan.batch_size.why,
            "lr": plan.lr.why,
            "warmup_iters": plan.warmup.why,
            "precise_bn": plan.precise_bn.why,
            "backbone_weights": plan.backbone_weights.why,
        },
        "train_split_effective": splits.train_split,
        "validation": splits.validation,
        "val_fraction_effective": splits.val_fraction,
        "objects_left_out": dict(splits.dropped),
        "train_images": len(splits.train),
        "val_images": len(splits.val) if splits.val else 0,
        "torch": str(torch.__version__),
    }
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def closing_summary(
    config: TrainConfig, run: Path, history: list[dict[str, Any]], splits: TrainingSplits, seconds: float
) -> list[str]:
    """What ``ssd train`` says last: the best epoch and its figures, where the checkpoints are,
    and the two commands to run next, written out for this run."""
    validated = [r for r in history if "val" in r]
    lines = [f"ssd train: done in {_duration(seconds)}; run folder {run}"]
    if validated:
        best = max(validated, key=lambda r: r["val"]["map"])
        on = (
            splits.validation
            if splits.val_fraction
            else f"{splits.validation}, {len(splits.val or [])} images"
        )
        lines.append(
            f"  best epoch {best['epoch']} of {history[-1]['epoch']}: mAP@0.5 {best['val']['map50']:.3f}, "
            f"mAP {best['val']['map']:.3f} on {on}"
        )
    else:
        lines.append(f"  no validation ({splits.validation}): best.pt is the last epoch's")
    lines.append(f"  checkpoints: {run / 'best.pt'} (best), {run / 'last.pt'} (last; --resume continues it)")
    if splits.dropped:
        lines.append(
            f"  classes: {', '.join(splits.train.classes)}; {sum(splits.dropped.values())} objects of "
            "other classes left out"
        )
    artifact = run / "model.onnx"
    evaluate = ["ssd evaluate", f"--model {artifact}", f"--data {config.data}"]
    if splits.val_fraction:
        evaluate.append(f"--val-fraction {splits.val_fraction:g} --seed {config.seed}")
    elif splits.val is not None and config.val_split:
        evaluate.append(f"--split {config.val_split}")
    if config.images:
        evaluate.append(f"--images {config.images}")
    lines += [
        "next:",
        f"  ssd export --checkpoint {run / 'best.pt'} --out {artifact}",
        "  " + " ".join(evaluate),
    ]
    return lines


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ssd train`` (and of ``python -m model.train`` under torchrun)."""
    base = TrainConfig(data="")
    parser.add_argument(
        "--model",
        default=base.model,
        choices=list(MODELS),
        help=f"default {base.model}: {defaults.MODEL_WHY}",
    )
    parser.add_argument("--data", required=True, help="a VOC root, a COCO instances JSON or a YOLO data.yaml")
    parser.add_argument(
        "--classes",
        default=None,
        metavar="A,B,C",
        help="train on these classes only, numbered in this order; objects of the others are left out "
        "(and counted in the summary). An .onnx artifact stands for its classes in its order: the "
        "model trained can replace it (a Label Studio export numbers its labels alphabetically)",
    )
    parser.add_argument("--epochs", type=int, default=base.epochs)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"per process (default {defaults.MAX_AUTO_BATCH}, halved down to {defaults.MIN_AUTO_BATCH} "
        f"while an epoch would have fewer than {defaults.MIN_STEPS_PER_EPOCH} steps)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="default: the recipe's, scaled to the global batch"
    )
    parser.add_argument("--out", default=None, help="run folder (default runs/MODEL)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument(
        "--precise-bn",
        type=int,
        default=None,
        help="recompute batch-norm statistics on N batches before validating (default: as many as "
        f"make {defaults.PRECISE_BN_IMAGES} images, where the model has batch norm; 0: off)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after N epochs of this run (resume later); the schedule stays --epochs'",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="fine-tune: start from this checkpoint's weights, with a fresh optimizer and schedule",
    )
    parser.add_argument("--device", default=base.device, help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    parser.add_argument("--workers", type=int, default=base.workers, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=base.seed)
    parser.add_argument(
        "--optimizer", choices=["sgd", "adamw"], default="sgd", help="default sgd, as the recipes"
    )
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--schedule", choices=["cosine", "multistep"], default=None)
    parser.add_argument(
        "--warmup-iters",
        type=int,
        default=None,
        # argparse formats help with %: the percent sign doubled.
        help=f"default {defaults.WARMUP_FRACTION * 100:g}%% of the run's steps, "
        f"at most {defaults.MAX_WARMUP}",
    )
    parser.add_argument("--freeze-backbone", action="store_true", help="do not train the base network")
    parser.add_argument(
        "--backbone-weights",
        default="auto",
        help=f"auto (default: ImageNet for a set under {defaults.PRETRAINED_BELOW:,} images where "
        "reachable, else the recipe's), recipe, imagenet, none, or a state-dict file",
    )
    parser.add_argument(
        "--scale-set",
        default=None,
        help="default box sizes: the model's first set (default), voc, small (see ssd models)",
    )
    parser.add_argument(
        "--train-split", default=None, help="default: train, or the data's only split where it has one"
    )
    parser.add_argument(
        "--val-split",
        default=None,
        help="default: val where the data has it; else a share of the training split is held out",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=base.val_fraction,
        help=f"the share of the training split held out for validation where the data has no "
        f"validation split (default {base.val_fraction:g}; chosen by --seed, recorded in config.yaml; "
        "0: no validation)",
    )
    parser.add_argument("--images", default=None, help="COCO: the image folder, if not beside the JSON")
    parser.add_argument("--no-photometric", dest="photometric", action="store_false", default=None)
    parser.add_argument("--no-zoom-out", dest="zoom_out", action="store_false", default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["out"] = args.out or f"runs/{values.get('model', defaults.MODEL)}"
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssd train", description="Train an SSD.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(config_from_args(args))
    except TrainingDiverged as exc:
        print(f"ssd train: {exc}", file=sys.stderr)
        return 1
    # A run that cannot start: bad options, bad data, a missing checkpoint, unusable weights.
    except (TrainError, DatasetError, CheckpointError, WeightsError, FileNotFoundError) as exc:
        print(f"ssd train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
