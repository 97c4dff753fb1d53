"""The wheel as a user installs it: built from the tree, installed with the ``serve`` extra into an
empty virtual environment (no torch, nothing of this checkout on its path), then ``ssd --help``,
``ssd predict`` and ``ssd serve`` on the demo model passed by path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from live import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
PHOTO = ROOT / "photos" / "val2017" / "000000165518.jpg"


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def test_the_extras_are_the_groups_uv_installs():
    """``pip install ssd-detector[serve]`` and ``uv sync`` install the same thing: each uv group
    names its extra, and the serving extra pulls no torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    groups = project["dependency-groups"]
    assert set(extras) == {"serve", "train"}
    assert groups["serving"] == ["ssd-detector[serve]"] and groups["train"] == ["ssd-detector[train]"]
    assert not any(d.startswith(("torch", "torchvision")) for d in extras["serve"])


@pytest.mark.slow
def test_the_wheel_serves_with_the_serve_extra_alone(tmp_path):
    uv = _uv()
    subprocess.run([*uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("ssd_detector-*.whl")
    venv = tmp_path / "venv"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"  # the suite's own Python
    subprocess.run([*uv, "venv", "--quiet", "--python", here, str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([*uv, "pip", "install", "--quiet", "--python", str(python), f"{wheel}[serve]"],
                   check=True, capture_output=True, timeout=900)  # fmt: skip
    ssd = venv / "bin" / "ssd"
    away = tmp_path / "elsewhere"  # not the checkout: only the wheel can answer
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSD_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {"SSD_PROVIDERS": "cpu", "SSD_DRAIN_S": "0"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ssd), *args], cwd=away, env=env, capture_output=True, text=True, timeout=300
        )

    helped = run("--help")
    assert helped.returncode == 0 and "serve" in helped.stdout and "predict" in helped.stdout
    torch = subprocess.run([str(python), "-c", "import torch"], cwd=away, env=env, capture_output=True)
    assert torch.returncode != 0, "the serving install pulled torch"

    predicted = run("predict", str(DEMO), str(PHOTO))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    (result,) = json.loads(predicted.stdout)["results"]
    assert (result["width"], result["height"]) == (612, 612)

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(ssd), "serve", "--model", str(DEMO), "--port", str(port)],
                              cwd=away, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ssd serve from the wheel was not ready in 120 s"
            time.sleep(0.3)
        answer = httpx.post(url + "/detect", content=PHOTO.read_bytes(), timeout=60)
        assert answer.status_code == 200 and answer.json()["results"][0]["width"] == 612
        assert httpx.get(url + "/docs", timeout=10).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        log.close()
