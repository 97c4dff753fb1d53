"""What the training defaults become for a run (model/defaults.py), and why."""

import math
from types import SimpleNamespace

import pytest
import torch

from model import defaults
from model.build import build_model
from model.checkpoint import atomic_save, load_model
from model.registry import MODELS
from model.weights import WeightsError

SSDLITE = MODELS["ssdlite320_mobilenet_v3_large"].recipe  # lr 0.15 at batch 192
VGG = MODELS["ssd300_vgg16"].recipe  # lr 0.002 at batch 32


def _given(**values):
    base = dict(batch_size=None, lr=None, optimizer="sgd", warmup_iters=None, precise_bn=None, epochs=30)
    return SimpleNamespace(**(base | values))


@pytest.mark.parametrize(
    ("images", "world", "batch"),
    [
        (400, 1, 8),
        (100, 1, 8),
        (5, 1, 5),
        (800, 1, 8),
        (1600, 1, 16),
        (2000, 1, 16),  # the synthetic set: the demo model's batch
        (3200, 1, 32),
        (118_287, 1, 32),  # COCO
        (3200, 2, 16),
    ],
)
def test_batch_keeps_enough_steps_an_epoch(images, world, batch):
    assert defaults.batch_size(None, images, world).value == batch
    assert defaults.batch_size(12, images, world) == defaults.Setting(12, "--batch-size")


def test_learning_rate_is_square_root_scaled_below_the_recipe_batch_and_linear_above():
    small = defaults.learning_rate(None, "sgd", SSDLITE, 16)
    assert small.value == pytest.approx(0.15 * math.sqrt(16 / 192)) and "square root" in small.why
    assert defaults.learning_rate(None, "sgd", VGG, 64).value == pytest.approx(0.004)
    assert defaults.learning_rate(None, "adamw", SSDLITE, 64).value == pytest.approx(2e-3)
    assert defaults.learning_rate(0.3, "sgd", SSDLITE, 16) == defaults.Setting(0.3, "--lr")


def test_warmup_is_a_small_fraction_of_the_run():
    assert defaults.warmup(None, 750).value == 38  # 5% of 750
    assert defaults.warmup(None, 100_000).value == 1000
    assert defaults.warmup(None, 3).value == 1
    assert defaults.warmup(5000, 750).value == 750  # never longer than the run


def test_precise_batch_norm_by_default_where_there_is_batch_norm():
    assert defaults.precise_bn(None, True, 16).value == 16  # 256 images
    assert defaults.precise_bn(None, True, 32).value == 8
    assert defaults.precise_bn(None, True, 5).value == 52
    assert defaults.precise_bn(None, False, 16).value == 0
    assert defaults.precise_bn(0, True, 16).value == 0


def test_a_small_set_starts_from_imagenet_where_reachable_and_says_so_where_not():
    fetched = []
    reach = defaults.starting_weights(
        "auto", SSDLITE, "mobilenet_v3_large", 400, fetch=lambda b: fetched.append(b) or "from the cache"
    )
    assert reach.value == "imagenet" and "from the cache" in reach.why and fetched == ["mobilenet_v3_large"]

    def offline(backbone):
        raise OSError("no network")

    unreachable = defaults.starting_weights("auto", SSDLITE, "mobilenet_v3_large", 400, fetch=offline)
    assert unreachable.value is None
    assert (
        "not reachable (no network)" in unreachable.why
        and "mobilenet_v3_large-8738ca79.pth" in unreachable.why
    )
    # A large set follows the recipe (SSDlite: from scratch) without fetching anything.
    large = defaults.starting_weights("auto", SSDLITE, "mobilenet_v3_large", 50_000, fetch=offline)
    assert large.value is None and "recipe" in large.why
    # VGG's recipe wants ImageNet weights: fetched, or said to be out of reach.
    large_vgg = defaults.starting_weights("auto", VGG, "vgg16", 50_000, fetch=lambda b: "from the cache")
    assert large_vgg.value == "imagenet" and "the recipe's (from the cache)" in large_vgg.why
    assert defaults.starting_weights("auto", VGG, "vgg16", 50_000, fetch=offline).value is None
    # Asked for by name and out of reach: an error, not a silent random start.
    with pytest.raises(WeightsError, match="--backbone-weights recipe: ImageNet weights for vgg16 are not"):
        defaults.starting_weights("recipe", VGG, "vgg16", 400, fetch=offline)
    assert defaults.starting_weights("none", VGG, "vgg16", 400, fetch=offline).value is None
    assert defaults.starting_weights("w.pth", VGG, "vgg16", 400, fetch=offline).value == "w.pth"


def test_the_plan_table_names_each_choice_and_its_reason():
    weights = defaults.Setting(None, "ImageNet weights for mobilenet_v3_large are not reachable (x)")
    plan = defaults.plan(_given(), SSDLITE, 400, 1, True, weights)
    assert (plan.batch_size.value, plan.steps_per_epoch, plan.total_steps) == (8, 50, 1500)
    assert plan.warmup.value == 75 and plan.precise_bn.value == 32
    table = "\n".join(plan.table())
    for text in (
        "batch  8 ",
        "toward 100 steps an epoch",
        "50 per epoch, 1500 in all",
        "75 steps",
        "0.03062",
        "recomputed on 32 batches",
        "random",
        "not reachable",
    ):
        assert text in table, text


def test_a_checkpoint_trained_from_imagenet_weights_loads_with_its_backbone_layout(tmp_path):
    """SSDlite's MobileNetV3 has a smaller tail from scratch: the checkpoint says which it has."""
    full = build_model("ssdlite320_mobilenet_v3_large", 4, pretrained_layout=True)
    reduced = build_model("ssdlite320_mobilenet_v3_large", 4)
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in reduced.parameters())
    state = {
        "model": full.state_dict(),
        "model_name": full.name,
        "num_classes": 4,
        "classes": ["a", "b", "c"],
    }
    atomic_save(state | {"pretrained_layout": True}, tmp_path / "full.pt")
    model, _ = load_model(tmp_path / "full.pt")
    for key, value in full.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
