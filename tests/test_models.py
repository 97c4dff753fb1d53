import logging
import urllib.error

import pytest
import torch
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large
from torchvision.models.detection import (
    SSDLite320_MobileNet_V3_Large_Weights,
    ssd300_vgg16,
    ssdlite320_mobilenet_v3_large,
)

from model import MODELS, PostprocessConfig, build_model
from model.postprocess import postprocess
from model.weights import WeightsError, build_from_weights, load_into, num_classes_in, read_weights


def _last_convs(head):
    return [m if isinstance(m, torch.nn.Conv2d) else m[-1] for m in head.module_list]


def _torchvision(name, num_classes):
    """A random torchvision SSD whose outputs are well spread.

    Left as initialised, SSDlite's activations vanish (outputs ~1e-15, every score tied) and
    SSD300's saturate the softmax: either way any order of tied detections is right, and the
    comparison would prove little. So: Kaiming convolutions, random batch-norm statistics, and the
    last head layers scaled to logits of std 2 and offsets of std 0.5.
    """
    torch.manual_seed(0)
    builder = {"ssd300_vgg16": ssd300_vgg16, "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large}[
        name
    ]
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    size = model.transform.fixed_size
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        probe = model.transform(list(torch.rand(1, 3, *size)))[0].tensors
        out = model.head(list(model.backbone(probe).values()))
        for key, head, target in [
            ("cls_logits", model.head.classification_head, 2.0),
            ("bbox_regression", model.head.regression_head, 0.5),
        ]:
            factor = target / out[key].std()
            for conv in _last_convs(head):
                conv.weight.mul_(factor)
                conv.bias.mul_(factor)
    return model


@pytest.mark.parametrize(("name", "size"), [("ssd300_vgg16", 300), ("ssdlite320_mobilenet_v3_large", 320)])
def test_torchvision_checkpoint_gives_the_same_outputs(tmp_path, name, size):
    reference = _torchvision(name, num_classes=7)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    ours, loaded = build_from_weights(name, path)
    ours.eval()
    assert ours.num_classes == 7 and loaded.source == str(path)

    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_logits, regression = ours(images)
        normalised = reference.transform(list(images))[0].tensors
        expected = reference.head(list(reference.backbone(normalised).values()))
    torch.testing.assert_close(cls_logits, expected["cls_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regression, expected["bbox_regression"], atol=1e-5, rtol=1e-5)

    # The whole pipeline: torchvision's model end to end against ours plus our post-processing.
    reference.score_thresh, reference.nms_thresh, reference.topk_candidates, reference.detections_per_img = (
        0.01,
        0.45,
        400,
        200,
    )
    with torch.no_grad():
        theirs = reference(list(images))
    det = postprocess(cls_logits, regression, ours.priors, PostprocessConfig(remove_empty=False)).per_image()
    for a, b in zip(det, theirs, strict=True):
        assert torch.equal(a["labels"] + 1, b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["boxes"] * size, b["boxes"], atol=1e-3, rtol=0)


def test_reference_checkpoint_layout_with_model_key(tmp_path):
    # torchvision's reference train.py saves {"model": state_dict, "optimizer": ..., ...}.
    reference = _torchvision("ssdlite320_mobilenet_v3_large", num_classes=4)
    torch.save({"model": reference.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    ours, _ = build_from_weights("ssdlite320_mobilenet_v3_large", tmp_path / "ckpt.pth")
    assert num_classes_in(reference.state_dict(), "ssdlite320_mobilenet_v3_large") == 4 == ours.num_classes


def test_weights_enum_from_the_hub_cache(tmp_path, monkeypatch):
    """With no network, torchvision's weights enum still works from torch's hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):  # as on a machine without network, wherever the test runs
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    weights = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    with pytest.raises(WeightsError, match=r"could not download .*COCO_V1"):
        read_weights("ssdlite320_mobilenet_v3_large", "COCO_V1")

    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    reference = _torchvision("ssdlite320_mobilenet_v3_large", num_classes=91)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    ours, loaded = build_from_weights("ssdlite320_mobilenet_v3_large", "COCO_V1")
    assert loaded.source == "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"
    assert loaded.categories[1] == "person" and ours.num_classes == 91
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_weight_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights("ssd300_vgg16", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_weights("ssd300_vgg16", tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="no member 'COCO_V9'"):
        read_weights("ssd300_vgg16", "COCO_V9")
    with pytest.raises(WeightsError, match="publishes no weights for ssd512_vgg16"):
        read_weights("ssd512_vgg16", "COCO_V1")
    lite = build_model("ssdlite320_mobilenet_v3_large", num_classes=5)
    other = build_model("ssdlite320_mobilenet_v3_large", num_classes=9).state_dict()
    with pytest.raises(WeightsError, match="of another shape"):
        load_into(lite, other)
    with pytest.raises(ValueError, match="unknown model 'ssd999'"):
        build_model("ssd999", num_classes=3)


def test_backbone_weights_from_a_file(tmp_path):
    torch.manual_seed(2)
    net = mobilenet_v3_large()  # full tail, as the ImageNet weights have it
    torch.save(net.state_dict(), tmp_path / "mnv3.pth")
    model = build_model(
        "ssdlite320_mobilenet_v3_large", num_classes=3, backbone_weights=tmp_path / "mnv3.pth"
    )
    first_conv = model.backbone.features[0][0][0].weight
    assert torch.equal(first_conv, net.features[0][0].weight)


def test_backbone_weights_unreachable_fall_back_to_random(monkeypatch, caplog):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(MobileNet_V3_Large_Weights, "get_state_dict", offline)
    with caplog.at_level(logging.WARNING):
        model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3, backbone_weights="imagenet")
    assert "random initialisation" in caplog.text
    assert model.num_priors == 3234


def test_freeze_base():
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3, freeze_base=True)
    model.train()
    assert not any(p.requires_grad for p in model.backbone.features.parameters())
    assert all(p.requires_grad for p in model.backbone.extra.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(m.training for m in model.backbone.features.modules())
    assert model.backbone.extra.training


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_runs(name):
    model = build_model(name, num_classes=4).eval()
    with torch.no_grad():
        cls_logits, regression = model(torch.rand(2, 3, *model.input_size))
    assert cls_logits.shape == (2, model.num_priors, 4) and regression.shape == (2, model.num_priors, 4)
    assert torch.isfinite(cls_logits).all() and torch.isfinite(regression).all()
    with pytest.raises(ValueError, match="takes"):
        model(torch.rand(1, 3, 64, 64))


def test_architecture_details():
    vgg = build_model("ssd300_vgg16", num_classes=3)
    assert vgg.backbone.scale_weight.shape == (512,) and torch.all(vgg.backbone.scale_weight == 20)
    assert vgg.feature_sizes == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    ssd512 = build_model("ssd512_vgg16", num_classes=3)
    assert ssd512.feature_sizes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    resnet = build_model("ssd300_resnet50", num_classes=3)
    assert resnet.feature_sizes == vgg.feature_sizes
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.backbone.extra.modules())
    voc = build_model("ssd300_vgg16", num_classes=3, scale_set="voc")
    assert voc.priors[0, 2].item() == pytest.approx(0.1)  # 30 px at 300
    with pytest.raises(ValueError, match="no scale set"):
        build_model("ssdlite320_mobilenet_v3_large", num_classes=3, scale_set="voc")


def test_channels_last_gives_the_same_outputs_and_state_dict():
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3).eval()
    images = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        expected = model(images)
        model.use_channels_last()
        got = model(images)
    assert model.backbone.features[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    fresh = build_model("ssdlite320_mobilenet_v3_large", num_classes=3)
    assert set(model.state_dict()) == set(fresh.state_dict())
