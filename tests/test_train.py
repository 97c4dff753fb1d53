"""Training on CPU: outputs, exact resume, divergence, and DDP with two gloo processes."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model import train as training
from model.checkpoint import CheckpointError, load_model, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from model.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, "voc", images=8, val_images=4, seed=3, image_size=(160, 160))
    return out


def _config(data, out, **overrides):
    values = dict(
        model="ssdlite320_mobilenet_v3_large",
        data=str(data),
        out=str(out),
        epochs=2,
        batch_size=4,
        workers=0,
        device="cpu",
        warmup_iters=1,
        lr=0.01,
        backbone_weights="none",
    )
    return training.TrainConfig(**(values | overrides))


@pytest.mark.slow
def test_outputs_and_exact_resume(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, "ssd.train")
    straight = training.train(_config(tiny_data, tmp_path / "straight"))
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "curves.png"):
        assert (straight / name).is_file(), name
    # What the defaults became, said at start and kept in config.yaml: here the unset batch norm.
    assert "what the defaults became for this run" in caplog.text
    assert "recomputed on 64 batches" in caplog.text and "start  random" in caplog.text
    settings = yaml.safe_load((straight / "config.yaml").read_text())
    assert (settings["batch_size_effective"], settings["precise_bn_effective"]) == (4, 64)
    assert settings["steps_per_epoch"] == 2 and settings["why"]["batch_size"] == "--batch-size"
    assert settings["backbone_weights_effective"] is None
    assert any((straight / "tensorboard").iterdir())
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"map", "map50", "map75", "voc07_map", "per_class"} <= set(lines[0]["val"])
    assert lines[0]["train"]["loss"] > 0 and lines[0]["images_per_s"] > 0

    halves = tmp_path / "halves"
    training.train(_config(tiny_data, halves, epochs=2, stop_after=1))  # as if stopped after epoch 1
    assert read_checkpoint(halves / "last.pt")["epoch"] == 1
    training.train(_config(tiny_data, halves, epochs=2, resume=True))
    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(halves / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert len((halves / "metrics.jsonl").read_text().splitlines()) == 2

    model, checkpoint = load_model(straight / "best.pt")
    assert checkpoint["classes"] == a["classes"] and model.num_classes == len(a["classes"]) + 1


@pytest.mark.slow
def test_fine_tuning_starts_from_a_checkpoint_with_a_fresh_schedule(tiny_data, tmp_path):
    base = training.train(_config(tiny_data, tmp_path / "base", epochs=1))
    # lr 0: the weights stay the checkpoint's, so any difference would come from the loading.
    tuned = training.train(
        _config(tiny_data, tmp_path / "tuned", epochs=1, lr=0.0, init_from=str(base / "last.pt"))
    )
    start, end = read_checkpoint(base / "last.pt"), read_checkpoint(tuned / "last.pt")
    model = training.build_model("ssdlite320_mobilenet_v3_large", len(start["classes"]) + 1)
    for name, _ in model.named_parameters():
        assert torch.equal(start["model"][name], end["model"][name]), name
    assert end["epoch"] == 1 and end["scheduler"]["last_epoch"] == start["scheduler"]["last_epoch"]
    record = json.loads((tuned / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and record["wall_time_s"] >= record["epoch_time_s"] > 0

    with pytest.raises(CheckpointError, match="--init-from needs a ssd300_vgg16"):
        training.train(
            _config(tiny_data, tmp_path / "other", model="ssd300_vgg16", init_from=str(base / "last.pt"))
        )
    # Resuming checks the scale set as --init-from does: other default boxes, other head meaning.
    base_copy = tmp_path / "resumed"
    base_copy.mkdir()
    (base / "last.pt").rename(base_copy / "last.pt")
    with pytest.raises(
        CheckpointError, match=r"--resume needs a ssdlite320_mobilenet_v3_large \(scale set small\)"
    ):
        training.train(_config(tiny_data, base_copy, epochs=2, resume=True, scale_set="small"))


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    run = training.train(_config(tiny_data, tmp_path / "run", epochs=2, stop_after=1))
    before = (run / "last.pt").read_bytes()

    real = training.MultiBoxLoss.forward

    def poisoned(self, *args, **kwargs):
        parts = real(self, *args, **kwargs)
        return parts._replace(total=parts.total * float("nan"))

    monkeypatch.setattr(training.MultiBoxLoss, "forward", poisoned)
    with pytest.raises(training.TrainingDiverged, match="the loss became nan at epoch 2, step 1"):
        training.train(_config(tiny_data, run, epochs=2, resume=True))
    assert (run / "last.pt").read_bytes() == before


def test_schedule_and_weight_decay_groups():
    factors = [training._lr_factor(s, 100, 10, "cosine", ()) for s in (0, 5, 10, 55, 100)]
    assert factors[0] == pytest.approx(1e-3) and factors[1] < factors[2]
    assert factors[2] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.1 * torch.pi)).item()))
    assert factors[-1] == pytest.approx(0.0, abs=1e-9)
    steps = [training._lr_factor(s, 100, 0, "multistep", (0.5, 0.9)) for s in (49, 50, 89, 90)]
    assert steps == pytest.approx([1.0, 0.1, 0.1, 0.01])

    from model import build_model

    model = build_model("ssd300_vgg16", num_classes=3)
    decay, no_decay = training._parameter_groups(model, 5e-4)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 5e-4
    assert any(p is model.backbone.scale_weight for p in no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "model.train",
        "--model",
        "ssdlite320_mobilenet_v3_large",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--lr",
        "0.01",
        "--warmup-iters",
        "1",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = read_checkpoint(out / "last.pt")
    assert checkpoint["epoch"] == 1 and len(checkpoint["rng"]) == 2  # one RNG state per process
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config


def test_precise_batch_norm_is_the_average_over_the_batches():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.03)).eval()
    batches = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(4)]
    training.recompute_batch_norm(net, batches)
    with torch.no_grad():
        activations = torch.cat([net[0](b) for b in batches])
    norm = net[1]
    torch.testing.assert_close(norm.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert norm.momentum == 0.03 and not net.training  # settings and mode restored


def test_bad_data_and_missing_checkpoints_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    common = ["--model", "ssdlite320_mobilenet_v3_large", "--device", "cpu", "--workers", "0"]
    assert training.main([*common, "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")]) == 2
    assert "VOC" in capsys.readouterr().err
    from model.data.synth import generate

    generate(tmp_path / "data", "yolo", images=2, val_images=1, seed=1, image_size=(64, 64))
    code = training.main(
        [
            *common,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "b"),
            "--resume",
            "--batch-size",
            "2",
        ]
    )
    assert code == 2 and "last.pt does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"), [("epochs", 0), ("batch_size", 0), ("lr", -0.1), ("precise_bn", -1)]
)
def test_impossible_options_are_refused_before_anything_runs(tmp_path, option, value):
    with pytest.raises(training.TrainError, match=f"--{option.replace('_', '-')} {value}: must be positive"):
        training.train(_config(tmp_path / "no-data", tmp_path / "run", **{option: value}))
    assert not (tmp_path / "run").exists()
