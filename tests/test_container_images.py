"""The serving and trainer images built from the Dockerfile and run for real: `make image-test`
(deploy/image-test.sh), where a Docker engine runs or can be started here. The suite installs no
engine (CI's machine has none: this test then skips, saying so); `make image-test` does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def engine_reason() -> str | None:
    """Why no engine can run the images here, or None where one runs or can be started."""
    if shutil.which("docker") is None:
        return "no Docker engine installed (docker.io); `make image-test` installs it"
    compose_v2 = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    if not compose_v2 and shutil.which("docker-compose") is None:
        return "neither `docker compose` nor docker-compose is installed; `make image-test` installs one"
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return None
    if shutil.which("dockerd") is None:
        return "docker is installed but not its engine (dockerd, package docker.io)"
    if os.geteuid() != 0:
        return "dockerd is not running, and starting it needs root"
    return None  # the script starts it


@pytest.mark.slow
@pytest.mark.timing
def test_images_build_serve_retrain_and_stop_cleanly():
    reason = engine_reason()
    if reason is not None:
        pytest.skip(reason)
    result = subprocess.run(
        [str(ROOT / "deploy" / "image-test.sh")], capture_output=True, text=True, timeout=3600
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "image-test: PASSED" in result.stdout
