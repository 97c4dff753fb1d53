"""Augmentation keeps boxes on the pixels they annotate, through every transform."""

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.transforms import collate, eval_transforms, train_transforms

COLOURS = torch.tensor(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], dtype=torch.uint8
)


def _scene(height=240, width=400):
    """Black image with one solid rectangle per colour; label i is colour i."""
    boxes = torch.tensor(
        [
            [10, 20, 110, 200],
            [150, 30, 230, 90],
            [250, 120, 390, 230],
            [140, 150, 200, 235],
            [300, 5, 380, 60],
        ],
        dtype=torch.float32,
    )
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for colour, (x0, y0, x1, y1) in zip(COLOURS, boxes.long().tolist(), strict=True):
        image[:, y0:y1, x0:x1] = colour[:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(len(boxes)),
        "difficult": torch.tensor([False, True, False, False, True]),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def _drawn_box(image, colour):
    """Bounding box of the pixels close to ``colour`` (interpolation blurs edges a little)."""
    pixels = image.float() * (255.0 if image.dtype.is_floating_point else 1.0)
    distance = (pixels - colour.float()[:, None, None]).abs().amax(dim=0)
    ys, xs = torch.nonzero(distance < 100, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _check(image, target, tolerance=2.0):
    assert len(target["boxes"]) == len(target["labels"]) == len(target["difficult"])
    for box, label, difficult in zip(target["boxes"], target["labels"], target["difficult"], strict=True):
        drawn = _drawn_box(image, COLOURS[label])
        assert drawn is not None, f"box {box.tolist()} of label {label} covers no pixel of its colour"
        assert torch.allclose(box, drawn, atol=tolerance), (label, box.tolist(), drawn.tolist())
        assert bool(difficult) == bool(label in (1, 4))  # the flags travel with their boxes


GEOMETRIC = {
    "zoom_out": v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=1.0),
    "iou_crop": v2.Compose(
        [
            v2.RandomIoUCrop(),
            v2.SanitizeBoundingBoxes(labels_getter=lambda s: (s[1]["labels"], s[1]["difficult"])),
        ]
    ),
    "flip": v2.RandomHorizontalFlip(p=1.0),
    "resize": v2.Resize((300, 300), antialias=True),
    "pipeline": train_transforms((300, 300), photometric=False, fill=(0.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_boxes_cover_the_same_pixels(name):
    torch.manual_seed(0)
    image, target = _scene()
    kept = 0
    for _ in range(25):
        out_image, out_target = GEOMETRIC[name](image, target)
        _check(out_image, out_target)
        kept += len(out_target["boxes"])
    assert kept > 0


def test_photometric_distortion_moves_no_box():
    torch.manual_seed(1)
    image, target = _scene()
    out_image, out_target = v2.RandomPhotometricDistort(p=1.0)(image, target)
    assert torch.equal(out_target["boxes"], target["boxes"])
    assert not torch.equal(out_image, image)


def test_full_training_pipeline_output():
    torch.manual_seed(2)
    image, target = _scene()
    transform = train_transforms((320, 320))
    samples = [transform(image, target) for _ in range(8)]
    for out_image, out_target in samples:
        assert out_image.shape == (3, 320, 320) and out_image.dtype == torch.float32
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0
        boxes = out_target["boxes"]
        assert ((boxes[:, 2:] > boxes[:, :2]).all()) and boxes.min() >= 0 and boxes.max() <= 320
    images, boxes, labels, targets = collate(samples)
    assert images.shape == (8, 3, 320, 320)
    assert boxes.shape[:2] == labels.shape and boxes.max() <= 1.0
    for i, (_, out_target) in enumerate(samples):
        n = len(out_target["labels"])
        assert torch.equal(labels[i, :n], out_target["labels"]) and (labels[i, n:] == -1).all()
        assert torch.allclose(boxes[i, :n] * 320, out_target["boxes"].float())
    assert targets[0]["image_id"] == 7


def test_eval_transform_only_resizes():
    image, target = _scene()
    out_image, out_target = eval_transforms((300, 300))(image, target)
    assert out_image.shape == (3, 300, 300)
    expected = target["boxes"] * torch.tensor([300 / 400, 300 / 240, 300 / 400, 300 / 240])
    torch.testing.assert_close(out_target["boxes"].float(), expected)
    _check((out_image * 255).round().to(torch.uint8), out_target)
