"""The model artifact: one ONNX graph from uint8 pixels to padded detections, checked against
PyTorch (our eager post-processing, and torchvision's own SSD for torchvision weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import helpers
import numpy as np
import onnx
import pytest
import torch

import cli
from export import verify
from export.diagnose import explain
from export.exporter import ExportOptions, export_artifact, sample_images
from export.reference import Reference, eager_reference, torchvision_reference
from export.sources import Source
from model.postprocess import PostprocessConfig, decode_outputs
from service.artifact import ArtifactError, Detector

CLASSES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
LITE = "ssdlite320_mobilenet_v3_large"


def calibrated(name: str, num_classes: int = len(CLASSES) + 1, seed: int = 0):
    return helpers.calibrated(name, num_classes, seed)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(lite_checkpoint) -> Path:
    return lite_checkpoint


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    return exported.path


def test_export_writes_a_checked_self_describing_artifact(artifact, checkpoint):
    proto = onnx.load(artifact)
    onnx.checker.check_model(proto, full_check=True)
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert meta["model"] == LITE
    assert json.loads(meta["input_size"]) == [320, 320]
    assert (float(meta["score_threshold"]), float(meta["iou_threshold"]), int(meta["max_detections"])) == (
        0.01,
        0.45,
        200,
    )
    assert meta["source"] == "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert json.loads(meta["metrics"])["map50"] == 0.93
    assert meta["created_at"].endswith("Z")
    ops = {n.op_type for n in proto.graph.node}
    assert {"NonMaxSuppression", "TopK", "Softmax", "Cast"} <= ops
    # The batch dimension is symbolic on the input and every output.
    images = [i for i in proto.graph.input if i.name == "images"]
    for value in [*images, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, value.name
    # The class count is the graph's own, beside the metadata (the service checks one against the other).
    class_ids = [i for i in proto.graph.initializer if i.name == "class_ids"]
    assert onnx.numpy_helper.to_array(class_ids[0]).tolist() == list(range(len(json.loads(meta["classes"]))))
    assert not list(artifact.parent.glob(".*.tmp"))  # the temporary file is gone


def test_export_prints_the_sha256_of_the_file(exported):
    printed = json.loads(exported.stdout.strip().splitlines()[-1])
    assert printed["sha256"] == hashlib.sha256(exported.path.read_bytes()).hexdigest()
    assert printed["metadata"] == {p.key: p.value for p in onnx.load(exported.path).metadata_props}
    assert "verified against PyTorch" in exported.stderr


def test_export_options_reach_the_exporter(checkpoint, tmp_path, monkeypatch, capsys):
    """Every post-processing and format flag, as the exporter receives it (the export itself is
    tested above and in tests/test_export_sweep.py)."""
    import export.exporter

    given = {}

    def export_artifact(source, out, options):
        given.update(source=source, options=options)
        return export.exporter.Artifact(Path(out), "0" * 64, {})

    monkeypatch.setattr(export.exporter, "export_artifact", export_artifact)
    code, _, err = run_cli(
        ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.onnx"), "--max-detections",
         "50", "--score-threshold", "0.2", "--iou-threshold", "0.6", "--topk-candidates", "100",
         "--class-agnostic-nms", "--fp16"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert given["options"] == ExportOptions(
        PostprocessConfig(score_threshold=0.2, iou_threshold=0.6, topk_candidates=100, max_detections=50,
                          class_agnostic=True),
        fp16=True,
    )  # fmt: skip
    assert given["source"].classes == CLASSES


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_onnx_runtime_equals_pytorch(artifact, lite_model, batch):
    images = sample_images((320, 320), 7, seed=batch)[:batch]
    reference = eager_reference(lite_model, PostprocessConfig())(images)
    got = verify.run(verify.session(artifact), images)
    assert got.boxes.shape == (batch, 200, 4) and got.labels.dtype == np.int64
    assert reference.num_detections.sum() > 50  # a real comparison: plenty of detections
    report = verify.Report()
    for i in range(batch):
        verify.compare_image(reference.image(i), got.image(i), 1e-4, 1e-5, 0.01, f"image {i}", report)
    assert not report.problems
    assert report.excused <= 0.01 * report.detections
    # Padding as the contract says.
    for i, n in enumerate(got.num_detections):
        assert (got.labels[i, n:] == -1).all() and (got.scores[i, n:] == 0).all()
        assert (np.diff(got.scores[i, :n]) <= 0).all()


def test_a_batch_equals_its_images_one_by_one(artifact):
    sess = verify.session(artifact)
    images = sample_images((320, 320), 5, seed=11)
    together = verify.run(sess, images)
    for i in range(5):
        alone = verify.run(sess, images[i : i + 1])
        assert alone.num_detections[0] == together.num_detections[i]
        np.testing.assert_allclose(alone.scores[0], together.scores[i], atol=1e-5)
        np.testing.assert_allclose(alone.boxes[0], together.boxes[i], atol=1e-4)


def test_verification_catches_a_different_graph(artifact, lite_model):
    """The check can fail: a reference with another IoU threshold keeps other boxes."""
    other = eager_reference(lite_model, PostprocessConfig(iou_threshold=0.3))
    with pytest.raises(verify.VerificationError, match="no counterpart"):
        verify.verify(
            verify.session(artifact), other, sample_images((320, 320)), PostprocessConfig(iou_threshold=0.3)
        )


def test_export_defaults_are_the_contract_and_live_in_postprocess_config():
    """The contract (README, "Export a model artifact"): threshold 0.01, IoU 0.45, top 400 per
    class, K = 200; ``ssd export`` takes them from PostprocessConfig, the one home of these numbers."""
    args = cli.build_parser().parse_args(["export", "--checkpoint", "x.pt", "--out", "x.onnx"])
    contract = {"score_threshold": 0.01, "iou_threshold": 0.45, "topk_candidates": 400, "max_detections": 200}
    assert {key: getattr(args, key) for key in contract} == contract
    assert {key: getattr(PostprocessConfig(), key) for key in contract} == contract


def test_raw_outputs_are_the_decoded_boxes_and_scores(lite_model, tmp_path):
    path = tmp_path / "raw.onnx"
    artifact = export_artifact(Source(lite_model, CLASSES, "test"), path, ExportOptions(raw=True))
    assert artifact.metadata["outputs"] == "raw"
    images = sample_images((320, 320), 3)
    boxes, scores = verify.session(path).run(["boxes", "scores"], {"images": images})
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        ref_scores, ref_boxes = decode_outputs(*lite_model(pixels), lite_model.priors)
    assert boxes.shape == (3, 3234, 4) and scores.shape == (3, 3234, len(CLASSES))
    np.testing.assert_allclose(boxes, ref_boxes.numpy(), atol=1e-5)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5, rtol=1e-4)


def test_broken_artifacts_are_refused_with_a_clear_error(artifact, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        Detector(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model")
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        Detector(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty"):
        Detector(empty)
    with pytest.raises(ArtifactError, match="does not exist"):
        Detector(tmp_path / "missing.onnx")
    # A valid ONNX model that is not one of ours.
    proto = onnx.load(artifact)
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, foreign)
    with pytest.raises(ArtifactError, match="not an ssd export"):
        Detector(foreign)


def test_onnx_runtime_threads_follow_the_usable_cores(artifact, monkeypatch):
    """Under taskset or a cpuset ONNX Runtime would still size its pool by the machine's cores."""
    import os

    from service.artifact import usable_cores

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2})
    assert usable_cores() == 1
    assert Detector(artifact).session.get_session_options().intra_op_num_threads == 1
    assert verify.session(artifact).get_session_options().intra_op_num_threads == 1
    assert Detector(artifact, intra_op_threads=3).session.get_session_options().intra_op_num_threads == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert usable_cores() is None  # ONNX Runtime's own choice


def test_detector_reads_everything_from_the_metadata(artifact):
    detector = Detector(artifact)
    assert detector.info.classes == CLASSES
    assert detector.info.input_size == (320, 320)
    assert detector.info.max_detections == 200
    assert detector.providers == ["CPUExecutionProvider"]
    assert detector.info.describe()["metrics"]["map50"] == 0.93


def test_export_errors_are_clear(tmp_path, capsys):
    code, _, err = run_cli(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", "x.onnx"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["export", "--torchvision", "ssd300_vgg16", "--out", "x.onnx"], capsys)
    assert code == 2 and "--weights" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    code, _, err = run_cli(
        ["export", "--torchvision", "ssd300_vgg16", "--weights-file", str(bad), "--out", "x.onnx"], capsys
    )
    assert code == 2 and "bad.pt" in err


def test_predict_writes_json_and_annotated_images(artifact, tmp_path, capsys):
    from PIL import Image

    paths = []
    for i, pixels in enumerate(sample_images((240, 400), 2, seed=3)):
        path = tmp_path / f"scene{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        ["predict", str(artifact), *paths, str(broken), "--out", str(out), "--score-threshold", "0.2"], capsys
    )
    assert code == 1 and "broken.jpg" in err  # the bad file is named, the others are done
    report = json.loads(stdout.strip().splitlines()[-1])
    first = report["results"][0]
    assert (first["width"], first["height"]) == (400, 240)
    assert first["detections"] and all(
        d["score"] >= 0.2 and d["label"] in CLASSES for d in first["detections"]
    )
    x1, y1, x2, y2 = first["detections"][0]["box"]
    assert 0 <= x1 < x2 <= 400 and 0 <= y1 < y2 <= 240  # pixels of the original image
    assert (out / "scene0.jpg").is_file() and (out / "predictions.json").is_file()


def test_predict_walks_a_folder(artifact, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    for i, name in enumerate(("a/x.png", "b/x.jpg", "top.JPG")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample_images((120, 160), 1, seed=i)[0]).save(
            folder / name, format="PNG" if "png" in name else "JPEG"
        )
    (folder / "a" / "x.txt").write_text("a label file, not an image: not read")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["predict", str(artifact), str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert [Path(r["filename"]).relative_to(folder).as_posix() for r in report["results"]] == [
        "a/x.png",
        "b/x.jpg",
        "top.JPG",
    ]
    # The two x images keep their folders apart.
    assert all((out / n).is_file() for n in ("a/x.jpg", "b/x.jpg", "top.jpg"))
    code, _, err = run_cli(["predict", str(artifact), str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere: no such file or folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["predict", str(artifact), str(tmp_path / "empty")], capsys)
    assert code == 2 and "no images in" in err


def test_predict_score_threshold_has_the_artifact_floor(artifact, tmp_path, capsys):
    from PIL import Image

    floor = Detector(artifact).info.score_threshold
    never_read = str(tmp_path / "missing.png")  # refused before any image is read
    code, stdout, err = run_cli(["predict", str(artifact), never_read, "--score-threshold", "0.005"], capsys)
    assert code == 2 and not stdout
    assert f"score_threshold 0.005 is below this model's floor of {floor} (the threshold baked" in err
    for nonsense in ("nan", "1.5", "-0.1", "x"):
        code, _, err = run_cli(["predict", str(artifact), never_read, "--score-threshold", nonsense], capsys)
        assert code == 2 and "--score-threshold" in err
    image = tmp_path / "scene.png"
    Image.fromarray(sample_images((240, 400), 1, seed=3)[0]).save(image)
    at_floor = ["predict", str(artifact), str(image), "--score-threshold", str(floor)]
    code, stdout, err = run_cli(at_floor, capsys)
    assert code == 0, err  # at the floor is fine: the graph keeps the scores above it
    # A floor above the default (0.5): the default becomes the floor instead of failing.
    proto = onnx.load(artifact)
    (prop,) = [p for p in proto.metadata_props if p.key == "score_threshold"]
    prop.value = "0.6"
    high = tmp_path / "high.onnx"
    onnx.save(proto, high)
    code, stdout, err = run_cli(["predict", str(high), str(image)], capsys)
    assert code == 0, err
    assert all(d["score"] >= 0.6 for d in json.loads(stdout)["results"][0]["detections"])


def test_detector_io_binding_path_gives_the_same_outputs(artifact):
    """The IOBinding path (used on CUDA) run on the CPU: same outputs as a plain run."""
    detector = Detector(artifact)
    images = sample_images((320, 320), 3)
    plain = detector.run(images)
    detector.io_binding, detector._output_device = True, "cpu"
    bound = detector.run(images)
    for a, b in zip(plain, bound, strict=True):
        np.testing.assert_array_equal(a, b)


def _cut_before_dropping_empty_boxes(name: str, model, config: PostprocessConfig) -> Reference:
    """The reference as it was: torchvision cuts at K, then the empty boxes are dropped (short of K)."""
    from torchvision.models import detection

    tv = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=model.num_classes)
    tv.load_state_dict(model.state_dict())
    tv.eval()
    tv.score_thresh, tv.nms_thresh = config.score_threshold, config.iou_threshold
    tv.topk_candidates, tv.detections_per_img = config.topk_candidates, config.max_detections
    k = config.max_detections

    @torch.no_grad()
    def detect(images):
        results = tv(list(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0))
        out = verify.Outputs(
            np.zeros(len(images), np.int64),
            np.zeros((len(images), k, 4), np.float32),
            np.zeros((len(images), k), np.float32),
            np.full((len(images), k), -1, np.int64),
        )
        for i, r in enumerate(results):
            boxes = r["boxes"] / 320.0
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            n = int(keep.sum())
            out.num_detections[i] = n
            out.boxes[i, :n], out.scores[i, :n] = boxes[keep].numpy(), r["scores"][keep].numpy()
            out.labels[i, :n] = r["labels"][keep].numpy() - 1
        return out

    fixed = torchvision_reference(name, model.num_classes, model.state_dict(), config)
    return Reference("torchvision, cut at K first", detect, fixed.raw)


@pytest.fixture(scope="module")
def crowded_lite():
    """torchvision's SSDlite layout, 4 classes, every box a confident object and many pushed off the
    image: more than K survivors, and boxes that clipping empties inside torchvision's top K."""
    return helpers.set_regime(calibrated(LITE, num_classes=5, seed=1), "crowded")


def test_torchvision_reference_drops_empty_boxes_before_the_cut_at_k(crowded_lite):
    config = PostprocessConfig()
    images = sample_images((320, 320), 3)
    old = _cut_before_dropping_empty_boxes(LITE, crowded_lite, config)(images)
    assert (old.num_detections < config.max_detections).all()  # the case of the bug: short of K
    reference = torchvision_reference(LITE, 5, crowded_lite.state_dict(), config)(images)
    eager = eager_reference(crowded_lite, config)(images)
    assert (reference.num_detections == config.max_detections).all()
    report = verify.Report()
    for i in range(len(images)):
        verify.compare_image(reference.image(i), eager.image(i), 1e-4, 1e-5, 0.01, f"image {i}", report)
    assert not report.problems and report.excused == 0


def test_a_failed_verification_names_the_stage_where_the_pipelines_part(crowded_lite, lite_model, tmp_path):
    """A reference of other weights: the exporter refuses, and says the network outputs differ."""
    source = Source(
        crowded_lite, ["a", "b", "c", "d"], "test", reference=lambda config: eager_reference(other, config)
    )
    other = calibrated(LITE, num_classes=5, seed=3)
    with pytest.raises(verify.VerificationError) as error:
        export_artifact(source, tmp_path / "refused.onnx")
    message = str(error.value)
    assert "first difference, stage by stage against PyTorch (eager export graph): network outputs" in message
    assert not (tmp_path / "refused.onnx").exists()


def test_the_cut_at_k_of_the_old_torchvision_reference_is_named(crowded_lite):
    config = PostprocessConfig()
    old = _cut_before_dropping_empty_boxes(LITE, crowded_lite, config)
    finding = _explain(old, crowded_lite, config)
    assert "the cut at K: torchvision, cut at K first's own post-processing differs" in finding, finding


def test_a_cascade_of_ties_is_a_valid_selection_and_a_wrong_one_is_not(lite_model):
    """The check that excuses tie cascades (near-equal overlapping boxes: either may survive NMS,
    and what it suppresses follows) accepts the right selection and refuses wrong ones."""
    config = PostprocessConfig()
    images = sample_images((320, 320), 1)
    scores, boxes = eager_reference(lite_model, config).raw(images)
    got = eager_reference(lite_model, config)(images).image(0)
    assert verify.valid_selection(got, scores[0], boxes[0], config) is None
    # Scores moved within the tolerance: still a valid selection.
    best = int(np.argmax(scores[0, :, got.labels[0]]))
    twin_scores = scores[0].copy()
    twin_scores[best, got.labels[0]] += 1e-6
    assert verify.valid_selection(got, twin_scores, boxes[0], config) is None
    # A wrong one: a detection dropped, another that it overlapped kept, or an IoU threshold of 0.3.
    dropped = verify.Outputs(got.num_detections - 1, got.boxes[1:], got.scores[1:], got.labels[1:])
    assert "neither kept nor suppressed" in verify.valid_selection(dropped, scores[0], boxes[0], config)
    strict = PostprocessConfig(iou_threshold=0.3)
    assert verify.valid_selection(got, scores[0], boxes[0], strict) is not None


def _explain(reference: Reference, model, config: PostprocessConfig) -> str:
    """``explain`` with our eager pipeline in the artifact's place (no export needed)."""
    ours = eager_reference(model, config)
    return explain(reference, ours.detect, ours.raw, sample_images(model.input_size, 4), config)


def test_diagnosis_tells_the_network_from_the_selection(lite_model):
    config = PostprocessConfig()
    assert "depends on the batch" in _explain(eager_reference(lite_model, config), lite_model, config)
    # Another IoU threshold: same network, other NMS survivors, not a tie.
    other_nms = eager_reference(lite_model, PostprocessConfig(iou_threshold=0.3))
    finding = _explain(Reference("other", other_nms.detect, other_nms.raw), lite_model, config)
    assert "NMS survivors: other's own post-processing differs" in finding, finding
    # Other weights: the network outputs differ before any selection.
    other = calibrated(LITE, seed=5)
    finding = _explain(eager_reference(other, config), lite_model, config)
    assert finding.startswith("network outputs: class scores differ"), finding
    # Two neighbouring scores of a class made to swap places by 2e-6 (within the tolerance), the
    # top-k cut between them: the candidates differ by one box, and the diagnosis says it is a tie.
    same = eager_reference(lite_model, config)
    images = sample_images(lite_model.input_size, 4)
    column = same.raw(images)[0][0, :, 0]
    order = np.argsort(-column, kind="stable")[:60]
    rank = int(np.argmin(column[order[:-1]] - column[order[1:]]))
    upper, lower = order[rank], order[rank + 1]
    assert column[upper] - column[lower] < 5e-5  # a close pair exists among the best 60

    def swapped(batch):
        scores, boxes = same.raw(batch)
        scores[0, lower, 0] = scores[0, upper, 0] + 2e-6
        return scores, boxes

    cut = PostprocessConfig(topk_candidates=rank + 1)
    finding = _explain(Reference("swapped", same.detect, swapped), lite_model, cut)
    assert ") per-class candidates: image 0, class 0: " in finding and "a tie" in finding, finding
